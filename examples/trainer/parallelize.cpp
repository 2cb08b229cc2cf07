#include "parallelize.hpp"

#include "../parallelize/llama_tp_plan.hpp"

#include <titan/ac.hpp>
#include <titan/fsdp.hpp>
#include <titan/sharding.hpp>
#include <titan/tensor_parallel.hpp>

#include <cmath>

namespace titan::examples {

ParallelDims ParallelDims::from_config(const ParallelismConfig& config, int64_t world_size) {
  ParallelDims dims;
  dims.dp_replicate = config.data_parallel_replicate_degree;
  dims.tp = config.tensor_parallel_degree;
  const int64_t others = dims.dp_replicate * dims.tp;
  if (config.data_parallel_shard_degree == -1) {
    TORCH_CHECK(world_size % others == 0, "parallelism: data_parallel_replicate_degree (", dims.dp_replicate,
                ") x tensor_parallel_degree (", dims.tp, ") = ", others, " does not divide the world size ",
                world_size);
    dims.dp_shard = world_size / others;
  } else {
    dims.dp_shard = config.data_parallel_shard_degree;
  }
  TORCH_CHECK(dims.dp_replicate * dims.dp_shard * dims.tp == world_size,
              "parallelism: data_parallel_replicate_degree (", dims.dp_replicate, ") x data_parallel_shard_degree (",
              dims.dp_shard, ") x tensor_parallel_degree (", dims.tp, ") = ", dims.dp_replicate * dims.dp_shard * dims.tp,
              " but the job has ", world_size, " ranks");
  return dims;
}

titan::DeviceMesh ParallelDims::build_mesh(const titan::WorldPtr& world) const {
  titan::DeviceMesh mesh(world, {"dp_replicate", "dp_shard", "tp"}, {dp_replicate, dp_shard, tp});
  mesh.flatten({"dp_replicate", "dp_shard"}, "dp");
  mesh.flatten({"dp_shard", "tp"}, "shard_tp");
  return mesh;
}

void parallelize_llama(TransformerImpl& model, const titan::DeviceMesh& mesh, const ParallelDims& dims,
                       const TrainConfig& config) {
  const auto& parallelism = config.parallelism;
  if (dims.tp > 1) {
    auto plan = llama_tp_plan(tp_dims(model.args), dims.tp,
                              TpPlanOptions()
                                  .sequence_parallel(parallelism.enable_sequence_parallel)
                                  .loss_parallel(parallelism.enable_loss_parallel));
    titan::parallelize_module(model, mesh["tp"], plan);
  }

  const auto& ac = config.activation_checkpoint;
  titan::apply_activation_checkpointing(
      model.layers, titan::ActivationCheckpointOptions().mode(ac.mode).selective_ac_option(ac.selective_ac_option));

  const bool bf16 = config.training.mixed_precision_param == "bfloat16";
  if (dims.dp() == 1 && !bf16) return;  // nothing to shard, nothing to cast
  auto options = titan::FsdpOptions().reshard_after_forward(parallelism.reshard_after_forward);
  if (bf16) options.param_dtype(torch::kBFloat16);
  options.reduce_dtype(config.training.mixed_precision_reduce == "bfloat16" ? torch::kBFloat16 : torch::kFloat32);
  const auto fsdp_mesh = dims.dp_replicate > 1 ? mesh.slice({"dp_replicate", "dp_shard"}) : mesh["dp_shard"];
  for (const auto& layer : *model.layers) titan::fully_shard(*layer, fsdp_mesh, options);
  titan::fully_shard(model, fsdp_mesh, options);
}

double clip_grad_norm_by_layout(torch::nn::Module& model, double max_norm, const titan::ProcessGroupPtr& shard_group) {
  const int64_t group_size = shard_group ? shard_group->size() : 1;
  auto parameters = titan::sharded_parameters(model);
  torch::Tensor squared;  // [] float64, this rank's share of the global squared norm
  std::vector<torch::Tensor> grads;
  for (const auto& [name, sharded] : parameters) {
    const auto& grad = sharded.local.grad();
    if (!grad.defined()) continue;
    grads.push_back(grad);
    int64_t split = 1;
    for (const auto& level : sharded.layout.levels) split *= level.group->size();
    const double copies = static_cast<double>(group_size) / static_cast<double>(split);  // ranks holding this block
    auto term = grad.detach().to(torch::kFloat64).pow(2).sum() / copies;
    squared = squared.defined() ? squared + term : term;
  }
  if (!squared.defined()) return 0.0;
  if (group_size > 1) squared = titan::detail::all_reduce_raw(squared, *shard_group, titan::ReduceOp::Sum);
  const double norm = std::sqrt(squared.item<double>());
  if (max_norm > 0 && std::isfinite(norm)) {
    const double coefficient = max_norm / (norm + 1e-6);
    if (coefficient < 1.0) {
      torch::NoGradGuard no_grad;
      for (auto& grad : grads) grad.mul_(coefficient);
    }
  }
  return norm;
}

}  // namespace titan::examples
