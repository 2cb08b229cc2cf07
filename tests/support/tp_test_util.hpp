#pragma once
// Helpers shared by the tensor-parallel test files: gathering sharded parameters back and
// comparing them with an unsharded reference model.
#include "multirank.hpp"

#include <titan/tensor_parallel.hpp>

#include <cmath>

namespace tp_test {

/// The TP group of these tests: every rank of the job.
inline const titan::ProcessGroupPtr& tp_group() { return titan_test::world()->group(); }
/// The TP degree of these tests: the world size (1, 2 or 4).
inline int tp_size() { return titan_test::world()->world_size(); }

namespace F = torch::nn::functional;

/// A linear layer written like user code, buildable on the meta device: weight [out, in], optional
/// bias [out].
struct LinearImpl : torch::nn::Module {
  LinearImpl(int64_t in, int64_t out, bool with_bias, torch::Device device = torch::kCPU) {
    auto on = torch::TensorOptions().device(device);
    weight = register_parameter("weight", torch::randn({out, in}, on) / std::sqrt(double(in)));
    if (with_bias) bias = register_parameter("bias", torch::randn({out}, on) * 0.1);
  }
  torch::Tensor forward(const torch::Tensor& x) { return F::linear(x, weight, bias); }
  torch::Tensor weight, bias;
};
TORCH_MODULE(Linear);

/// `module`'s parameters and buffers by name: what titan::load_full_state_dict takes.
inline torch::OrderedDict<std::string, torch::Tensor> full_state(const torch::nn::Module& module) {
  auto state = module.named_parameters();
  for (const auto& item : module.named_buffers()) state.insert(item.key(), item.value());
  return state;
}

/// Every parameter of `parallel`, gathered, equals the same-named one of `reference`.
inline void check_parameters_match(const torch::nn::Module& parallel, const torch::nn::Module& reference, double tol) {
  auto expected = reference.named_parameters();
  auto sharded = titan::sharded_parameters(parallel);
  REQUIRE(sharded.size() == expected.size());
  for (const auto& [name, tensor] : sharded) {
    INFO("parameter ", name, " (", tensor.layout.placement(), ")");
    REQUIRE(expected.contains(name));
    CHECK_CLOSE(titan::gather_full(tensor), expected[name], tol);
  }
}

/// Every parameter gradient of `parallel`, gathered, equals the same-named one of `reference`.
inline void check_gradients_match(const torch::nn::Module& parallel, const torch::nn::Module& reference, double tol) {
  auto expected = reference.named_parameters();
  for (const auto& [name, tensor] : titan::sharded_parameters(parallel)) {
    INFO("gradient of ", name, " (", tensor.layout.placement(), ")");
    REQUIRE(tensor.local.grad().defined());
    titan::ShardedTensor grad{tensor.local.grad(), tensor.layout, tensor.blocks};
    CHECK_CLOSE(titan::gather_full(grad), expected[name].grad(), tol);
  }
}

/// One training step of the parallel `model` and the unsharded `reference` after their forwards:
/// checks that `loss_value` (the parallel run's loss over the whole batch) equals `ref_loss`,
/// runs both backwards, compares the gathered gradients, then steps both optimizers.
inline void check_step(torch::nn::Module& model, torch::nn::Module& reference, torch::optim::Optimizer& opt,
                       torch::optim::Optimizer& ref_opt, const torch::Tensor& loss, const torch::Tensor& ref_loss,
                       double loss_value, double tol = 1e-5) {
  CHECK(std::abs(loss_value - ref_loss.item<double>()) < tol);
  opt.zero_grad();
  ref_opt.zero_grad();
  loss.backward();
  ref_loss.backward();
  check_gradients_match(model, reference, tol);
  opt.step();
  ref_opt.step();
}

/// Tolerance of parameters after a few AdamW steps: Adam divides by sqrt(v), so elements whose
/// gradient is rounding noise (|g| ~ 1e-9) move by O(lr) in either implementation; the gradients
/// themselves are compared tightly (check_gradients_match) at every step.
constexpr double kAdamParamTol = 1e-4;

}  // namespace tp_test
