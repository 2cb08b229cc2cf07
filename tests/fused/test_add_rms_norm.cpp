// titan/fused/add_rms_norm.hpp: titan::add_rms_norm against x + delta and at::rms_norm (PyTorch's
// unfused operators, as the Llama block computed it before): sum, normed and the gradients of x,
// delta and weight bitwise on the ATen path (fp32, bf16, fp64; with and without a gradient
// reaching the sum from elsewhere), and with titan's CUDA kernels as close to the fp64 results as
// the unfused operators, up to one rounding (fused_testing.hpp: the residual's gradient and the
// norm's may cancel, so the unfused bf16 result, rounded twice, is no yardstick within a rounding),
// under per-operator activation checkpointing, through titan::call of a module returning both
// tensors, and the errors.
#include "fused_testing.hpp"

#include <cmath>
#include <string>
#include <tuple>

namespace {

using titan_test::device;
using titan_test::error_of;
using torch::Tensor;

constexpr double kEps = 1e-5;

/// Sum, normed and the gradients of x, delta and weight of sum(normed * w_normed) (+ sum(sum *
/// w_sum) when `w_sum` is defined), by `fn`.
struct Result {
  Tensor sum, normed, d_x, d_delta, d_weight;
};
template <typename Fn>
Result run(Fn&& fn, const Tensor& x, const Tensor& delta, const Tensor& weight, const Tensor& w_sum,
           const Tensor& w_normed) {
  auto a = x.detach().requires_grad_(true), b = delta.detach().requires_grad_(true);
  auto w = weight.detach().requires_grad_(true);
  auto [sum, normed] = fn(a, b, w);
  auto loss = (normed * w_normed).sum();
  if (w_sum.defined()) loss = (sum * w_sum).sum() + loss;  // the sum's own use first, as in a block's residual add
  loss.backward();
  return {sum.detach(), normed.detach(), a.grad(), b.grad(), w.grad()};
}

std::tuple<Tensor, Tensor> unfused(const Tensor& x, const Tensor& delta, const Tensor& weight) {
  auto sum = x + delta;
  return {sum, at::rms_norm(sum, {sum.size(-1)}, weight, kEps)};
}

std::tuple<Tensor, Tensor> fused(const Tensor& x, const Tensor& delta, const Tensor& weight) {
  return titan::add_rms_norm(x, delta, weight, kEps);
}

/// A pre-norm residual step as a module: (x + delta, rms_norm(x + delta)) through the fused path.
struct ResidualNormImpl : torch::nn::Module {
  ResidualNormImpl() { weight = register_parameter("weight", torch::randn({24}, torch::kDouble).to(torch::kFloat)); }
  std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& delta) {
    return titan::add_rms_norm(x, delta, weight, kEps);
  }
  Tensor weight;
};
TORCH_MODULE(ResidualNorm);

/// A block in the Llama shape: h = x + proj(x), out = h + up(rms_norm(h)), the add and norm fused,
/// the norm module called through titan::call.
struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    proj = register_module("proj", torch::nn::Linear(torch::nn::LinearOptions(24, 24).bias(false)));
    norm = register_module("norm", ResidualNorm());
    up = register_module("up", torch::nn::Linear(torch::nn::LinearOptions(24, 24).bias(false)));
  }
  Tensor forward(const Tensor& x) {                                 // x: [2, 5, 24]
    auto [h, normed] = titan::call(norm, x, titan::call(proj, x));  // [2, 5, 24] each
    return h + titan::call(up, normed);                             // [2, 5, 24]
  }
  torch::nn::Linear proj{nullptr}, up{nullptr};
  ResidualNorm norm{nullptr};
};
TORCH_MODULE(Block);

}  // namespace

TEST_CASE("fused add_rms_norm: sum, normed and gradients equal x + delta and at::rms_norm") {
  titan_test::fused_kernels_registered();
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
    for (bool sum_used : {true, false}) {
      CAPTURE(dtype);
      CAPTURE(sum_used);
      torch::manual_seed(3);
      auto x = (3 * torch::randn({2, 5, 24}, torch::kDouble)).to(dtype).to(device());  // [2, 5, 24]
      auto delta = torch::randn({2, 5, 24}, torch::kDouble).to(dtype).to(device());    // [2, 5, 24]
      auto weight = torch::randn({24}, torch::kDouble).to(dtype).to(device());         // [24]
      auto w_sum = sum_used ? torch::randn({2, 5, 24}, torch::kDouble).to(dtype).to(device()) : Tensor();
      auto w_normed = torch::randn({2, 5, 24}, torch::kDouble).to(dtype).to(device());
      const auto want = run(unfused, x, delta, weight, w_sum, w_normed);
      const auto got = run(fused, x, delta, weight, w_sum, w_normed);
      auto fp64 = [](const Tensor& t) { return t.defined() ? t.to(torch::kDouble) : t; };
      const auto exact = run(unfused, fp64(x), fp64(delta), fp64(weight), fp64(w_sum), fp64(w_normed));
      titan_test::check_matches_unfused({got.sum, got.normed, got.d_x, got.d_delta, got.d_weight},
                                        {want.sum, want.normed, want.d_x, want.d_delta, want.d_weight}, dtype,
                                        {exact.sum, exact.normed, exact.d_x, exact.d_delta, exact.d_weight});
    }
  }
}

TEST_CASE("fused add_rms_norm: a module returning both through titan::call, under per-operator AC") {
  titan_test::fused_kernels_registered();
  const auto x = torch::randn({2, 5, 24}, device());  // [2, 5, 24]
  titan_test::check_gradients_under_op_ac(
      [] {
        torch::manual_seed(4);
        return Block();
      },
      [&x](Block& block) { return titan::call(block, x).pow(2).sum(); }, {"aten::mm"});
  // The same block with the add and the norm unfused: the same gradients (bitwise on the ATen path).
  torch::manual_seed(4);
  Block block;
  block->to(device());
  titan::call(block, x).pow(2).sum().backward();
  torch::manual_seed(4);
  Block plain;
  plain->to(device());
  auto h = x + plain->proj->forward(x);
  (h + plain->up->forward(at::rms_norm(h, {24}, plain->norm->weight, kEps))).pow(2).sum().backward();
  titan_test::check_matches_unfused({block->proj->weight.grad(), block->norm->weight.grad(), block->up->weight.grad()},
                                    {plain->proj->weight.grad(), plain->norm->weight.grad(), plain->up->weight.grad()},
                                    torch::kFloat);
}

TEST_CASE("fused add_rms_norm: dispatcher operators") {
  titan::register_add_rms_norm_operators();
  for (const char* name : {"titan::add_rms_norm_forward", "titan::add_rms_norm_backward"}) {
    CAPTURE(name);
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    REQUIRE(op.has_value());
    CHECK(op->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd));
    CHECK(op->hasKernelForDispatchKey(c10::DispatchKey::CUDA) == titan_test::fused_kernels_registered());
  }
}

TEST_CASE("fused add_rms_norm: errors name what is wrong") {
  const auto x = torch::randn({2, 3, 8}, device()), w = torch::randn({8}, device());
  CHECK(error_of([&] { titan::add_rms_norm(x, x.narrow(1, 0, 2), w, kEps); })
            .find("x and delta must have one shape [..., D], got [2, 3, 8] and [2, 2, 8]") != std::string::npos);
  CHECK(error_of([&] { titan::add_rms_norm(x, x, torch::randn({4}, device()), kEps); })
            .find("weight must be [D] = [8] (the inputs' last dimension), got [4]") != std::string::npos);
  CHECK(error_of([&] { titan::add_rms_norm(x, x, w.to(torch::kDouble), kEps); })
            .find("must have one floating dtype (cast the weight to the activations' dtype), got Float, Float and "
                  "Double") != std::string::npos);
}
