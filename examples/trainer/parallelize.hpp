#pragma once
// Applying titan to the example Transformer, torchtitan's way: tensor parallel, then activation
// checkpointing, then FSDP, each a small step over an unchanged model built on the meta device.
//
//   ParallelDims dims = ParallelDims::from_config(config.parallelism, world->world_size());
//   titan::DeviceMesh mesh = dims.build_mesh(world);
//   Transformer model(args, torch::kMeta);
//   parallelize_llama(*model, mesh, dims, config);
//   titan::to_empty(*model, world->device());
//   init_weights(*model, seed);

#include "../common/config.hpp"
#include "../models/transformer.hpp"

#include <titan/mesh.hpp>

#include <cstdint>
#include <string>

namespace titan::examples {

/// The degrees of the mesh dp_replicate x dp_shard x tp, checked against the world size.
struct ParallelDims {
  int64_t dp_replicate = 1;
  int64_t dp_shard = 1;
  int64_t tp = 1;

  /// Resolves dp_shard = -1 and checks that the product equals `world_size` (the error names the
  /// config keys and values).
  static ParallelDims from_config(const ParallelismConfig& config, int64_t world_size);
  int64_t dp() const { return dp_replicate * dp_shard; }  ///< data-parallel degree
  /// The mesh {"dp_replicate", "dp_shard", "tp"}, plus flattened dims "dp" (data: batches, loss)
  /// and "shard_tp" (everything a parameter can be sharded over: gradient norm).
  titan::DeviceMesh build_mesh(const titan::WorldPtr& world) const;
};

/// Applies tensor parallelism (when dims.tp > 1), activation checkpointing (per
/// config.activation_checkpoint) and FSDP (when data-parallel or mixed precision asks for it) to
/// `model`, in that order. The model may still be on the meta device.
void parallelize_llama(TransformerImpl& model, const titan::DeviceMesh& mesh, const ParallelDims& dims,
                       const TrainConfig& config);

/// The global L2 norm of the gradients of `model`'s (possibly sharded) parameters, clipped to
/// `max_norm` like torch.nn.utils.clip_grad_norm_ (max_norm <= 0: measure only). Each parameter's
/// squared norm is divided by the number of ranks of `shard_group` holding the same block (from its
/// layout: e.g. norms replicated across tensor-parallel ranks), then summed over `shard_group`.
double clip_grad_norm_by_layout(torch::nn::Module& model, double max_norm, const titan::ProcessGroupPtr& shard_group);

}  // namespace titan::examples
