#include "parallelism.hpp"

#include <sstream>

namespace titan::examples {

ParallelDims ParallelDims::from_config(const ParallelismConfig& config, int64_t world_size) {
  ParallelDims dims;
  dims.pp = config.pipeline_parallel_degree;
  dims.dp_replicate = config.data_parallel_replicate_degree;
  dims.cp = config.context_parallel_degree;
  dims.tp = config.tensor_parallel_degree;
  const int64_t others = dims.pp * dims.dp_replicate * dims.cp * dims.tp;
  auto others_text = [&] {
    std::ostringstream text;
    text << "pipeline_parallel_degree (" << dims.pp << ") x data_parallel_replicate_degree (" << dims.dp_replicate
         << ") x context_parallel_degree (" << dims.cp << ") x tensor_parallel_degree (" << dims.tp << ")";
    return text.str();
  };
  if (config.data_parallel_shard_degree == -1) {
    TORCH_CHECK(world_size % others == 0, "parallelism: ", others_text(), " = ", others,
                " does not divide the world size ", world_size);
    dims.dp_shard = world_size / others;
  } else {
    dims.dp_shard = config.data_parallel_shard_degree;
  }
  TORCH_CHECK(others * dims.dp_shard == world_size, "parallelism: ", others_text(), " x data_parallel_shard_degree (",
              dims.dp_shard, ") = ", others * dims.dp_shard, " but the job has ", world_size, " ranks");
  dims.ep = config.expert_parallel_degree;
  TORCH_CHECK(dims.dp_shard % dims.ep == 0, "parallelism: expert_parallel_degree (", dims.ep,
              ") must divide data_parallel_shard_degree (", dims.dp_shard, "): the expert-parallel ranks are ",
              "data-parallel shard ranks holding different experts");
  return dims;
}

titan::DeviceMesh ParallelDims::build_mesh(const titan::WorldPtr& world) const {
  if (ep == 1) {
    titan::DeviceMesh mesh(world, {"pp", "dp_replicate", "dp_shard", "cp", "tp"}, {pp, dp_replicate, dp_shard, cp, tp});
    mesh.flatten({"dp_replicate", "dp_shard"}, "dp");
    mesh.flatten({"dp_shard", "cp"}, "dp_shard_cp");
    mesh.flatten({"dp_replicate", "dp_shard", "cp"}, "dp_cp");
    return mesh;
  }
  titan::DeviceMesh mesh(world, {"pp", "dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp"},
                         {pp, dp_replicate, dp_shard / ep, ep, cp, tp});
  mesh.flatten({"dp_shard_mod_ep", "ep"}, "dp_shard");
  mesh.flatten({"dp_replicate", "dp_shard_mod_ep", "ep"}, "dp");
  mesh.flatten({"dp_shard_mod_ep", "ep", "cp"}, "dp_shard_cp");
  mesh.flatten({"dp_replicate", "dp_shard_mod_ep", "ep", "cp"}, "dp_cp");
  mesh.flatten({"dp_shard_mod_ep", "cp"}, "dp_shard_mod_ep_cp");
  return mesh;
}

titan::DeviceMesh ParallelDims::fsdp_mesh(const titan::DeviceMesh& mesh) const {
  return dp_replicate > 1 ? mesh.slice({"dp_replicate", "dp_shard_cp"}) : mesh["dp_shard_cp"];
}

std::vector<std::string> ParallelDims::stage_dims() const {
  if (ep == 1) return {"dp_replicate", "dp_shard", "cp", "tp"};
  return {"dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp"};
}

titan::DeviceMesh ParallelDims::expert_fsdp_mesh(const titan::DeviceMesh& mesh) const {
  if (ep == 1) return fsdp_mesh(mesh);
  return dp_replicate > 1 ? mesh.slice({"dp_replicate", "dp_shard_mod_ep_cp"}) : mesh["dp_shard_mod_ep_cp"];
}

titan::ActivationCheckpointOptions activation_checkpoint_options(const TrainConfig& config) {
  const auto& ac = config.activation_checkpoint;
  titan::ActivationCheckpointOptions options;
  if (ac.mode == "none") return options.mode(titan::AcMode::None);
  if (ac.mode == "full") return options.mode(titan::AcMode::Full);
  TORCH_CHECK(ac.mode == "selective", "activation_checkpoint.mode = '", ac.mode,
              "' is not one of: none, full, selective");
  if (ac.selective_ac_option == "op") return options.mode(titan::AcMode::PerOperator);
  // validate() accepted it: a positive integer.
  return options.mode(titan::AcMode::EveryKthLayer).every_k(std::stoll(ac.selective_ac_option));
}

bool needs_fsdp(const ParallelDims& dims, const TrainConfig& config) {
  return dims.dp() > 1 || dims.cp > 1 || config.training.mixed_precision_param == "bfloat16";
}

titan::FsdpOptions fsdp_options(const TrainConfig& config) {
  titan::FsdpOptions options;
  options.reshard_after_forward(config.parallelism.reshard_after_forward &&
                                config.parallelism.pipeline_parallel_degree == 1);
  if (config.training.mixed_precision_param == "bfloat16") options.param_dtype(torch::kBFloat16);
  options.reduce_dtype(config.training.mixed_precision_reduce == "bfloat16" ? torch::kBFloat16 : torch::kFloat32);
  return options;
}

int64_t pipeline_stages_per_rank(const ParallelismConfig& parallelism) {
  const auto points = comma_list(parallelism.pipeline_parallel_split_points);
  const int64_t pp = parallelism.pipeline_parallel_degree;
  const bool interleaved = titan::is_multi_stage(titan::parse_schedule(parallelism.pipeline_parallel_schedule));
  if (points.empty()) return interleaved ? 2 : 1;
  const auto stages = static_cast<int64_t>(points.size()) + 1;
  TORCH_CHECK(stages % pp == 0, "parallelism.pipeline_parallel_split_points: ", points.size(), " split points make ",
              stages, " stages, which pipeline_parallel_degree ", pp, " ranks cannot hold equally");
  TORCH_CHECK(interleaved || stages == pp, "parallelism.pipeline_parallel_split_points: ", points.size(),
              " split points make ", stages, " stages but schedule ", parallelism.pipeline_parallel_schedule,
              " runs one stage per rank (", pp, " stages: ", pp - 1, " split points)");
  TORCH_CHECK(!interleaved || stages >= 2 * pp, "parallelism.pipeline_parallel_split_points: ", points.size(),
              " split points make ", stages, " stages, ", stages / pp, " per rank, but schedule ",
              parallelism.pipeline_parallel_schedule, " runs at least 2 per rank (", 2 * pp, " stages: ", 2 * pp - 1,
              " split points)");
  return stages / pp;
}

}  // namespace titan::examples
