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

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace titan::examples {

/// The degrees of the mesh pp x dp_replicate x dp_shard x cp x tp, checked against the world size,
/// the expert-parallel degree ep, whose ranks are borrowed from the ranks of one stage as torchtitan
/// borrows them: with etp = 1 the tensor-parallel ranks first, then the context-parallel ones,
/// then data-parallel shard ranks; with etp = tp (each expert split over the tp ranks) the
/// context-parallel, then the data-parallel shard ranks.
struct ParallelDims {
  int64_t pp = 1;
  int64_t dp_replicate = 1;
  int64_t dp_shard = 1;
  int64_t cp = 1;
  int64_t tp = 1;
  int64_t ep = 1;
  int64_t etp = 1;  ///< expert tensor parallelism: 1 or tp

  /// Resolves dp_shard = -1 and checks that the product equals `world_size` and that ep borrows
  /// whole groups (the errors name the config keys and values).
  static ParallelDims from_config(const ParallelismConfig& config, int64_t world_size);
  int64_t dp() const { return dp_replicate * dp_shard; }  ///< data-parallel degree
  /// The ep ranks taken from tp, cp and dp_shard (their product is ep).
  int64_t ep_from_tp() const { return etp > 1 ? 1 : std::min(ep, tp); }
  int64_t ep_from_cp() const { return std::min(ep / ep_from_tp(), cp); }
  int64_t ep_from_dp_shard() const { return ep / ep_from_tp() / ep_from_cp(); }
  /// The ranks of a stage holding the same experts (efsdp), whose expert gradients FSDP reduces.
  int64_t expert_fsdp_degree() const { return dp_shard * cp * tp / (ep * etp); }
  /// The mesh {"pp", "dp_replicate", "dp_shard", "cp", "tp"} (pipeline outermost, as torchtitan),
  /// plus the flattened dims "dp" (data: which samples), "dp_shard_cp" (FSDP's shards: the cp ranks
  /// of a sample hold the same parameters and reduce their gradients with the dp ranks) and "dp_cp"
  /// (the loss's tokens). With ep > 1, dp_shard, cp and tp are each split in two ("dp_shard_mod_ep"
  /// x "dp_shard_in_ep", ...), "ep" flattens the "_in_ep" parts (consecutive ranks) and "efsdp" the
  /// "_mod_ep" parts but tp's when etp > 1: the ranks holding the same experts, FSDP's shards of
  /// the experts.
  titan::DeviceMesh build_mesh(const titan::WorldPtr& world) const;
  /// The mesh fully_shard takes: ("dp_replicate", "dp_shard_cp") for HSDP, else "dp_shard_cp".
  titan::DeviceMesh fsdp_mesh(const titan::DeviceMesh& mesh) const;
  /// The base mesh dimensions other than pp: the ranks of one pipeline stage, flattened.
  std::vector<std::string> stage_dims() const;
  /// The stage dimensions whose ranks route different tokens through the MoE layers, over which
  /// their token counts sum: all of them, but tp's unless tp_ranks_route_apart (the counts are then
  /// the same on every tp rank).
  std::vector<std::string> token_routing_dims(bool sequence_parallel) const;
  /// The mesh fully_shard takes for expert weights, which the ep ranks do not share: "efsdp"
  /// (with "dp_replicate" for HSDP).
  titan::DeviceMesh expert_fsdp_mesh(const titan::DeviceMesh& mesh) const;
  /// What expert parallelism divides the experts' gradients by
  /// (titan::ExpertParallelOptions::gradient_divide_factor): ep, or ep / tp when ep spans the tp
  /// ranks and sequence parallel gives them parts of one sequence, whose gradients add up rather
  /// than average.
  double expert_gradient_divide_factor(bool sequence_parallel) const;
  /// Whether the tp ranks route different tokens (sequence parallel with the experts whole): then
  /// the MoE layers' token counts sum over them, else they are the same on every tp rank.
  bool tp_ranks_route_apart(bool sequence_parallel) const { return tp > 1 && sequence_parallel && etp == 1; }

 private:
  /// The base dimensions' names and sizes, outermost first.
  std::vector<std::pair<std::string, int64_t>> base_dims() const;
};

/// [activation_checkpoint] as titan's typed options: mode "none" / "full", or "selective" with
/// selective_ac_option "op" (per operator) or a positive integer k (every k-th layer).
titan::ActivationCheckpointOptions activation_checkpoint_options(const TrainConfig& config);

/// Whether the model needs FSDP: data or context parallelism, or ranks outside ep holding the same
/// experts (gradients to reduce), or bf16 compute (FSDP's param_dtype casts).
bool needs_fsdp(const ParallelDims& dims, const TrainConfig& config);

/// FSDP options from [parallelism] (reshard_after_forward, off with pipeline parallelism as in
/// torchtitan's default policy: a stage runs forward once per micro-batch) and [training] (mixed
/// precision; with fused_kernels = "cuda", keep_compute_copy, for FusedAdamW::write_compute_copies).
titan::FsdpOptions fsdp_options(const TrainConfig& config);

/// Stages per pipeline rank: the split points' stages over the degree, else 2 for an interleaved
/// schedule and 1 for the others. Errors name the keys.
int64_t pipeline_stages_per_rank(const ParallelismConfig& parallelism);

}  // namespace titan::examples
