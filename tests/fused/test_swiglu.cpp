// titan/fused/swiglu.hpp: titan::swiglu against silu(gate) * up (PyTorch's unfused operators, as
// the model computed it before): output and both gradients bitwise on the ATen path (fp32, bf16,
// fp64), within one rounding with titan's CUDA kernel (fused_testing.hpp), under per-operator
// activation checkpointing, and the errors.
#include "fused_testing.hpp"


#include <cmath>
#include <string>

namespace {

using titan_test::device;
using titan_test::error_of;
using torch::Tensor;

/// Output and the gradients of gate and up of sum(out * weights), by `fn`.
struct Result {
  Tensor out, d_gate, d_up;
};
template <typename Fn>
Result run(Fn&& fn, const Tensor& gate, const Tensor& up, const Tensor& weights) {
  auto a = gate.detach().requires_grad_(true), b = up.detach().requires_grad_(true);
  auto out = fn(a, b);
  (out * weights).sum().backward();
  return {out.detach(), a.grad(), b.grad()};
}

Result unfused(const Tensor& gate, const Tensor& up, const Tensor& weights) {
  return run([](const Tensor& a, const Tensor& b) { return torch::silu(a) * b; }, gate, up, weights);
}

Result fused(const Tensor& gate, const Tensor& up, const Tensor& weights) {
  return run([](const Tensor& a, const Tensor& b) { return titan::swiglu(a, b); }, gate, up, weights);
}

/// A gated projection: swiglu(w1 x, w3 x).
struct GateImpl : torch::nn::Module {
  GateImpl() {
    w1 = register_module("w1", torch::nn::Linear(torch::nn::LinearOptions(16, 32).bias(false)));
    w3 = register_module("w3", torch::nn::Linear(torch::nn::LinearOptions(16, 32).bias(false)));
  }
  Tensor forward(const Tensor& x) {  // x: [3, 16]
    return titan::swiglu(titan::call(w1, x), titan::call(w3, x));  // [3, 32]
  }
  torch::nn::Linear w1{nullptr}, w3{nullptr};
};
TORCH_MODULE(Gate);

}  // namespace

TEST_CASE("fused swiglu: output and gradients equal silu(gate) * up") {
  titan_test::fused_kernels_registered();
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
    CAPTURE(dtype);
    torch::manual_seed(3);
    auto gate = (3 * torch::randn({2, 5, 24}, torch::kDouble)).to(dtype).to(device());  // [2, 5, 24]
    auto up = torch::randn({2, 5, 24}, torch::kDouble).to(dtype).to(device());          // [2, 5, 24]
    auto weights = torch::randn({2, 5, 24}, torch::kDouble).to(dtype).to(device());     // [2, 5, 24]
    const auto want = unfused(gate, up, weights), got = fused(gate, up, weights);
    titan_test::check_matches_unfused({got.out, got.d_gate, got.d_up}, {want.out, want.d_gate, want.d_up}, dtype);
  }
}

TEST_CASE("fused swiglu: inputs one element past a 16-byte boundary give the bits of aligned ones") {
  // titan's CUDA kernels take 16-byte packs where every row starts at a 16-byte boundary, else one
  // element at a time, with the same arithmetic (docs/fused.md): on a GPU, both paths against each
  // other; on the CPU (the ATen path) the same operators twice.
  titan_test::fused_kernels_registered();
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    CAPTURE(dtype);
    torch::manual_seed(5);
    const auto gate = (3 * torch::randn({3, 7, 40})).to(dtype).to(device());  // [3, 7, 40]
    const auto up = torch::randn({3, 7, 40}).to(dtype).to(device());          // [3, 7, 40]
    const auto weights = torch::randn({3, 7, 40}).to(dtype).to(device());     // [3, 7, 40]
    const auto packs = fused(gate, up, weights);
    const auto single = fused(titan_test::shifted(gate), titan_test::shifted(up), weights);
    CHECK(titan_test::same_values(single.out, packs.out));
    CHECK(titan_test::same_values(single.d_gate, packs.d_gate));
    CHECK(titan_test::same_values(single.d_up, packs.d_up));
  }
}

TEST_CASE("fused swiglu: under per-operator activation checkpointing the gradients are unchanged") {
  titan_test::fused_kernels_registered();
  const auto x = torch::randn({3, 16}, device());  // [3, 16]
  titan_test::check_gradients_under_op_ac(
      [] {
        torch::manual_seed(4);
        return Gate();
      },
      [&x](Gate& gate) { return titan::call(gate, x).pow(2).sum(); }, {"aten::mm", "titan::swiglu_forward"});
}

TEST_CASE("fused swiglu: errors name what is wrong") {
  const auto a = torch::randn({2, 3}, device()), b = torch::randn({2, 4}, device());
  CHECK(error_of([&] { titan::swiglu(a, b); }).find("gate and up must have the same shape, got [2, 3] and [2, 4]") !=
        std::string::npos);
  CHECK(error_of([&] { titan::swiglu(a, a.to(torch::kDouble)); })
            .find("gate and up must have the same floating dtype, got Float and Double") != std::string::npos);
  CHECK(error_of([&] { titan::swiglu(a.to(torch::kLong), a.to(torch::kLong)); })
            .find("same floating dtype, got Long and Long") != std::string::npos);
}
