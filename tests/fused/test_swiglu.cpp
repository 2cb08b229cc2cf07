// titan/fused/swiglu.hpp: titan::swiglu against silu(gate) * up (PyTorch's unfused operators, as
// the model computed it before): output and both gradients bitwise on the ATen path (fp32, bf16,
// fp64), within one rounding with titan's CUDA kernel (fused_testing.hpp), under per-operator
// activation checkpointing, and the errors.
#include "fused_testing.hpp"

#include <titan/ac.hpp>

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

/// Whether `got` is within one rounding of `want` in `dtype` (relative 2^-mantissa, plus a floor).
bool within_rounding(const Tensor& got, const Tensor& want, torch::Dtype dtype) {
  const double unit = dtype == torch::kBFloat16 ? std::ldexp(1.0, -7) : dtype == torch::kHalf ? std::ldexp(1.0, -10)
                                                                                               : 1e-6;
  const auto error = (got.to(torch::kDouble) - want.to(torch::kDouble)).abs().cpu();
  return error.le(want.to(torch::kDouble).abs().cpu() * unit + 1e-6).all().item<bool>();
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
    CHECK((got.out.scalar_type() == dtype));
    if (titan_test::fused_kernels_run() && dtype != torch::kDouble) {  // one pass in fp32: one rounding
      CHECK(within_rounding(got.out, want.out, dtype));
      CHECK(within_rounding(got.d_gate, want.d_gate, dtype));
      CHECK(within_rounding(got.d_up, want.d_up, dtype));
    } else {  // the ATen implementation runs the same operators
      CHECK(titan_test::same_values(got.out, want.out));
      CHECK(titan_test::same_values(got.d_gate, want.d_gate));
      CHECK(titan_test::same_values(got.d_up, want.d_up));
    }
  }
}

TEST_CASE("fused swiglu: under per-operator activation checkpointing the gradients are unchanged") {
  titan_test::fused_kernels_registered();
  auto gradients = [](bool checkpointed) {
    torch::manual_seed(4);
    Gate gate;
    gate->to(device());
    if (checkpointed)
      titan::checkpoint_wrapper(*gate, titan::CheckpointWrapperOptions().policy(std::make_shared<titan::OpSavePolicy>(
                                           std::vector<std::string>{"aten::mm", "titan::swiglu_forward"},
                                           std::vector<std::string>{})));
    const auto x = torch::randn({3, 16}, device());  // [3, 16]
    titan::call(gate, x).pow(2).sum().backward();
    return std::make_pair(gate->w1->weight.grad(), gate->w3->weight.grad());
  };
  const auto [plain1, plain3] = gradients(false);
  const auto [ac1, ac3] = gradients(true);
  CHECK(titan_test::same_values(plain1, ac1));
  CHECK(titan_test::same_values(plain3, ac3));
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
