#pragma once
// titan/fsdp/options.hpp: what fully_shard is configured with: FsdpOptions (mixed precision,
// resharding, prefetching), FSDP2's _fsdp_api.py.

#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include <optional>

namespace titan {

/// Options of fully_shard, with chained setters.
struct FsdpOptions {
  /// Free the unsharded parameters after the unit's forward and all-gather them again for
  /// backward (less memory, one more all-gather). The root unit never reshards after a forward
  /// run with gradients enabled, since backward needs it first.
  TORCH_ARG(bool, reshard_after_forward) = true;
  /// Dtype of the unsharded parameters (compute and all-gather), e.g. torch::kBFloat16; unset:
  /// the parameters' own dtype. Sharded (master) parameters keep their dtype. Floating-point
  /// inputs of the unit are cast to it (see cast_forward_inputs).
  TORCH_ARG(std::optional<at::ScalarType>, param_dtype) = std::nullopt;
  /// With param_dtype: cast the unit's floating-point tensor inputs to it (FSDP2's
  /// MixedPrecisionPolicy.cast_forward_inputs). Off for units whose inputs already arrive in the
  /// compute dtype or must keep theirs (a transformer block's fp32 RoPE tables).
  TORCH_ARG(bool, cast_forward_inputs) = true;
  /// Dtype gradients are reduced in, e.g. torch::kFloat32; unset: param_dtype (or the parameters'
  /// dtype). The sharded gradient is cast back to the sharded parameter's dtype.
  TORCH_ARG(std::optional<at::ScalarType>, reduce_dtype) = std::nullopt;
  /// Start the next unit's all-gather (in the previous forward's order) before this unit computes.
  TORCH_ARG(bool, forward_prefetch) = true;
  /// In backward, start the all-gather of the unit that ran before this one in forward.
  TORCH_ARG(bool, backward_prefetch) = true;
  /// On a shard group of one rank without replicas, with param_dtype other than the parameters'
  /// own: keep the unsharded compute-dtype copy between steps and leave each gradient in the
  /// compute dtype (the shard's .grad is then a bf16 tensor of an fp32 parameter), so that the
  /// optimizer step reads the gradients as they are and writes the copy the next forward uses
  /// (FsdpHook::compute_copies, titan::adamw_copy_): one pass over the parameters instead of three.
  /// The copy is reused only while every shard's version counter is unchanged since it was written,
  /// so in-place changes (an optimizer without the copy, loading a checkpoint) are seen; writes
  /// through .data(), which autograd does not count either, are not. No effect elsewhere (several
  /// ranks, float8 gathers). Memory: the same with reshard_after_forward(false) (a unit's copy is
  /// held from forward to backward anyway, then replaces half of its fp32 gradients); with
  /// resharding after forward the kept copies add 2 bytes per parameter to the forward.
  TORCH_ARG(bool, keep_compute_copy) = false;
};

}  // namespace titan
