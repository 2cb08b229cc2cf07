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
  dims.etp = config.expert_tensor_parallel_degree;
  const int64_t ep = dims.ep, tp = dims.tp, cp = dims.cp;
  TORCH_CHECK(ep >= 1, "parallelism.expert_parallel_degree must be >= 1, got ", ep);
  TORCH_CHECK(dims.etp == 1 || dims.etp == tp, "parallelism.expert_tensor_parallel_degree (", dims.etp,
              ") must be 1 (each expert whole on a rank) or tensor_parallel_degree (", tp,
              ": each expert split over the tp ranks)");
  const int64_t borrowable = dims.dp_shard * cp * (dims.etp > 1 ? 1 : tp);
  TORCH_CHECK(borrowable % ep == 0, "parallelism: expert_parallel_degree (", ep,
              ") must divide data_parallel_shard_degree (", dims.dp_shard, ") x context_parallel_degree (", cp, ")",
              dims.etp > 1 ? "" : " x tensor_parallel_degree (" + std::to_string(tp) + ")", " = ", borrowable,
              ": the expert-parallel ranks are borrowed from those ranks (", dims.etp > 1 ? "" : "tensor-parallel first, ",
              "then context-parallel, then data-parallel shard ranks), each holding different experts");
  TORCH_CHECK(dims.etp > 1 || tp % ep == 0 || ep % tp == 0, "parallelism: expert_parallel_degree (", ep,
              ") and tensor_parallel_degree (", tp, ") must divide one another: ep borrows the tensor-parallel ",
              "ranks first, whole groups or a part that divides them");
  const int64_t beyond_tp = ep / dims.ep_from_tp();
  TORCH_CHECK(cp % beyond_tp == 0 || beyond_tp % cp == 0, "parallelism: expert_parallel_degree (", ep, ")",
              dims.etp > 1 ? "" : " / tensor_parallel_degree (" + std::to_string(tp) + ")", " = ", beyond_tp,
              " and context_parallel_degree (", cp, ") must divide one another: ep borrows the context-parallel ",
              "ranks", dims.etp > 1 ? "" : " after the tensor-parallel ones", ", whole groups or a part that divides them");
  return dims;
}

std::vector<std::pair<std::string, int64_t>> ParallelDims::base_dims() const {
  if (ep == 1) return {{"pp", pp}, {"dp_replicate", dp_replicate}, {"dp_shard", dp_shard}, {"cp", cp}, {"tp", tp}};
  const int64_t from_dp = ep_from_dp_shard(), from_cp = ep_from_cp(), from_tp = ep_from_tp();
  return {{"pp", pp},
          {"dp_replicate", dp_replicate},
          {"dp_shard_mod_ep", dp_shard / from_dp},
          {"dp_shard_in_ep", from_dp},
          {"cp_mod_ep", cp / from_cp},
          {"cp_in_ep", from_cp},
          {"tp_mod_ep", tp / from_tp},
          {"tp_in_ep", from_tp}};
}

titan::DeviceMesh ParallelDims::build_mesh(const titan::WorldPtr& world) const {
  std::vector<std::string> names;
  std::vector<int64_t> sizes;
  for (const auto& [name, size] : base_dims()) {
    names.push_back(name);
    sizes.push_back(size);
  }
  titan::DeviceMesh mesh(world, names, sizes);
  // The dims in base dimensions: as they are, or each as its two parts around ep.
  auto parts = [this](const std::string& dim) -> std::vector<std::string> {
    if (ep == 1 || dim == "dp_replicate") return {dim};
    return {dim + "_mod_ep", dim + "_in_ep"};
  };
  auto joined = [&parts](std::initializer_list<const char*> dims) {
    std::vector<std::string> all;
    for (const char* dim : dims)
      for (auto& part : parts(dim)) all.push_back(std::move(part));
    return all;
  };
  if (ep > 1) {
    for (const char* dim : {"dp_shard", "cp", "tp"}) mesh.flatten(parts(dim), dim);
    mesh.flatten({"dp_shard_in_ep", "cp_in_ep", "tp_in_ep"}, "ep");
    // With etp > 1 the tp ranks hold other slices of the same experts: not FSDP's to reduce.
    mesh.flatten(etp > 1 ? std::vector<std::string>{"dp_shard_mod_ep", "cp_mod_ep"}
                         : std::vector<std::string>{"dp_shard_mod_ep", "cp_mod_ep", "tp_mod_ep"},
                 "efsdp");
  }
  mesh.flatten(joined({"dp_replicate", "dp_shard"}), "dp");
  mesh.flatten(joined({"dp_shard", "cp"}), "dp_shard_cp");
  mesh.flatten(joined({"dp_replicate", "dp_shard", "cp"}), "dp_cp");
  return mesh;
}

titan::DeviceMesh ParallelDims::fsdp_mesh(const titan::DeviceMesh& mesh) const {
  return dp_replicate > 1 ? mesh.slice({"dp_replicate", "dp_shard_cp"}) : mesh["dp_shard_cp"];
}

std::vector<std::string> ParallelDims::stage_dims() const {
  std::vector<std::string> names;
  for (const auto& [name, size] : base_dims())
    if (name != "pp") names.push_back(name);
  return names;
}

std::vector<std::string> ParallelDims::token_routing_dims(bool sequence_parallel) const {
  std::vector<std::string> names;
  for (auto& name : stage_dims())
    if (tp_ranks_route_apart(sequence_parallel) || (name != "tp" && name != "tp_mod_ep" && name != "tp_in_ep"))
      names.push_back(std::move(name));
  return names;
}

titan::DeviceMesh ParallelDims::expert_fsdp_mesh(const titan::DeviceMesh& mesh) const {
  if (ep == 1) return fsdp_mesh(mesh);
  return dp_replicate > 1 ? mesh.slice({"dp_replicate", "efsdp"}) : mesh["efsdp"];
}

double ParallelDims::expert_gradient_divide_factor(bool sequence_parallel) const {
  return tp_ranks_route_apart(sequence_parallel) ? static_cast<double>(ep) / static_cast<double>(tp)
                                                 : static_cast<double>(ep);
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
  return dims.dp() > 1 || dims.cp > 1 || (dims.ep > 1 && dims.expert_fsdp_degree() > 1) ||
         config.training.mixed_precision_param == "bfloat16";
}

titan::FsdpOptions fsdp_options(const TrainConfig& config) {
  titan::FsdpOptions options;
  options.reshard_after_forward(config.parallelism.reshard_after_forward &&
                                config.parallelism.pipeline_parallel_degree == 1);
  if (config.training.mixed_precision_param == "bfloat16") options.param_dtype(torch::kBFloat16);
  options.reduce_dtype(config.training.mixed_precision_reduce == "bfloat16" ? torch::kBFloat16 : torch::kFloat32);
  // With titan's CUDA kernels, one-rank units keep their bf16 copy for FusedAdamW's titan::adamw_copy_.
  options.keep_compute_copy(config.training.fused_kernels == "cuda");
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
