#pragma once
// Helpers shared by the tensor-parallel test files: gathering sharded parameters back and
// comparing them with an unsharded reference model.
#include "../support/multirank.hpp"

#include <titan/tensor_parallel.hpp>

namespace tp_test {

/// The TP group of these tests: every rank of the job.
inline const titan::ProcessGroupPtr& tp_group() { return titan_test::world()->group(); }
/// The TP degree of these tests: the world size (1, 2 or 4).
inline int tp_size() { return titan_test::world()->world_size(); }

/// The global tensor of a (possibly sharded) tensor, all-gathered level by level, innermost first.
inline torch::Tensor gather_global(const titan::ShardedTensor& sharded) {
  auto full = sharded.local.detach();
  const auto& levels = sharded.layout.levels;
  std::vector<int64_t> extent = sharded.layout.global_shape;
  std::vector<std::vector<int64_t>> sizes;  // each level's split, outermost first
  for (const auto& level : levels) {
    sizes.push_back(titan::chunk_sizes(extent[static_cast<size_t>(level.dim)], level.group->size()));
    extent[static_cast<size_t>(level.dim)] = sizes.back()[static_cast<size_t>(level.group->rank())];
  }
  for (size_t i = levels.size(); i-- > 0;)
    full = titan::detail::all_gather_raw(full, *levels[i].group, levels[i].dim, sizes[i]);
  return full;
}

/// Every parameter of `parallel`, gathered, equals the same-named one of `reference`.
inline void check_parameters_match(const torch::nn::Module& parallel, const torch::nn::Module& reference, double tol) {
  auto expected = reference.named_parameters();
  auto sharded = titan::sharded_parameters(parallel);
  REQUIRE(sharded.size() == expected.size());
  for (const auto& [name, tensor] : sharded) {
    INFO("parameter ", name, " (", tensor.layout.placement(), ")");
    REQUIRE(expected.contains(name));
    CHECK_CLOSE(tp_test::gather_global(tensor), expected[name], tol);
  }
}

/// Every parameter gradient of `parallel`, gathered, equals the same-named one of `reference`.
inline void check_gradients_match(const torch::nn::Module& parallel, const torch::nn::Module& reference, double tol) {
  auto expected = reference.named_parameters();
  for (const auto& [name, tensor] : titan::sharded_parameters(parallel)) {
    INFO("gradient of ", name, " (", tensor.layout.placement(), ")");
    REQUIRE(tensor.local.grad().defined());
    titan::ShardedTensor grad{tensor.local.grad(), tensor.layout, tensor.box};
    CHECK_CLOSE(gather_global(grad), expected[name].grad(), tol);
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
