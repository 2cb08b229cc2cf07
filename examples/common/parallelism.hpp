#pragma once
// From the [parallelism], [activation_checkpoint] and [training] sections to titan's options: the
// mesh, activation checkpointing, FSDP and the pipeline stages per rank, shared by every model's
// parallelize function and the trainer.
//
//   ParallelDims dims = ParallelDims::from_config(config.parallelism, world->world_size());
//   titan::DeviceMesh mesh = dims.build_mesh(world);
//   titan::apply_activation_checkpointing(model.layers, activation_checkpoint_options(config));
//   for (auto& block : *model.layers) titan::fully_shard(*block, dims.fsdp_mesh(mesh), fsdp_options(config));

#include "config.hpp"

#include <titan/ac.hpp>
#include <titan/fsdp.hpp>
#include <titan/mesh.hpp>
#include <titan/pipeline.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace titan::examples {

/// The degrees of the mesh pp x dp_replicate x dp_shard x cp x tp, checked against the world size,
/// and the expert-parallel degree ep, a divisor of dp_shard (torchtitan borrows ep from the
/// data-parallel ranks the same way).
struct ParallelDims {
  int64_t pp = 1;
  int64_t dp_replicate = 1;
  int64_t dp_shard = 1;
  int64_t cp = 1;
  int64_t tp = 1;
  int64_t ep = 1;

  /// Resolves dp_shard = -1 and checks that the product equals `world_size` (the error names the
  /// config keys and values).
  static ParallelDims from_config(const ParallelismConfig& config, int64_t world_size);
  int64_t dp() const { return dp_replicate * dp_shard; }  ///< data-parallel degree
  /// The mesh {"pp", "dp_replicate", "dp_shard", "cp", "tp"} (pipeline outermost, as torchtitan),
  /// plus the flattened dims "dp" (data: which samples), "dp_shard_cp" (FSDP's shards: the cp ranks
  /// of a sample hold the same parameters and reduce their gradients with the dp ranks) and "dp_cp"
  /// (the loss's tokens). With ep > 1, dp_shard is itself "dp_shard_mod_ep" x "ep" (the ranks
  /// sharing one layer's experts, consecutive), and "dp_shard_mod_ep_cp" is FSDP's shards of the
  /// experts.
  titan::DeviceMesh build_mesh(const titan::WorldPtr& world) const;
  /// The mesh fully_shard takes: ("dp_replicate", "dp_shard_cp") for HSDP, else "dp_shard_cp".
  titan::DeviceMesh fsdp_mesh(const titan::DeviceMesh& mesh) const;
  /// The base mesh dimensions other than pp: the ranks of one pipeline stage, flattened.
  std::vector<std::string> stage_dims() const;
  /// The mesh fully_shard takes for expert weights, which the ep ranks do not share: fsdp_mesh
  /// without the ep ranks.
  titan::DeviceMesh expert_fsdp_mesh(const titan::DeviceMesh& mesh) const;
};

/// [activation_checkpoint] as titan's typed options: mode "none" / "full", or "selective" with
/// selective_ac_option "op" (per operator) or a positive integer k (every k-th layer).
titan::ActivationCheckpointOptions activation_checkpoint_options(const TrainConfig& config);

/// Whether the model needs FSDP: data or context parallelism (gradients to reduce), or bf16
/// compute (FSDP's param_dtype casts).
bool needs_fsdp(const ParallelDims& dims, const TrainConfig& config);

/// FSDP options from [parallelism] (reshard_after_forward, off with pipeline parallelism as in
/// torchtitan's default policy: a stage runs forward once per micro-batch) and [training] (mixed
/// precision).
titan::FsdpOptions fsdp_options(const TrainConfig& config);

/// Stages per pipeline rank: the split points' stages over the degree, else 2 for an interleaved
/// schedule and 1 for the others. Errors name the keys.
int64_t pipeline_stages_per_rank(const ParallelismConfig& parallelism);

}  // namespace titan::examples
