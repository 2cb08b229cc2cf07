#pragma once
// titan/fsdp/collectives.hpp: a unit's collectives: the all-gather buffers (GatherBucket), the
// copies into and out of the all-gather and reduce-scatter buffers (FSDP2's _fsdp_collectives.py).

#include <titan/collectives.hpp>
#include <titan/detail/torch_internals.hpp>
#include <titan/fsdp/param.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace titan {
namespace detail {

/// `view`'s elements as a tensor of its own, sharing the base's storage but neither its version
/// counter (writing through it does not invalidate what autograd saved of the base, like PyTorch's
/// _unsafe_preserve_version_counter) nor its autograd view link (which LibTorch's
/// Optimizer::zero_grad could not detach in place).
inline at::Tensor storage_alias(const at::Tensor& view) {
  at::NoGradGuard no_grad;
  return at::empty({0}, view.options()).set_(view.storage(), view.storage_offset(), view.sizes(), view.strides());
}

/// Replaces each entry of `values` ([n]) by its maximum over the group `group_of[i]` (null or one
/// rank: kept): one all-reduce per distinct group, of the entries it reduces.
inline void max_over_groups(at::Tensor& values, const std::vector<ProcessGroupPtr>& group_of) {
  std::vector<ProcessGroupPtr> groups;  // in the order of first appearance, the same on every rank
  for (const auto& g : group_of)
    if (g && g->size() > 1 && std::find(groups.begin(), groups.end(), g) == groups.end()) groups.push_back(g);
  for (const auto& group : groups) {
    std::vector<int64_t> rows;
    for (size_t i = 0; i < group_of.size(); ++i)
      if (group_of[i] == group) rows.push_back(static_cast<int64_t>(i));
    if (static_cast<int64_t>(rows.size()) == values.size(0)) {
      values = all_reduce_raw(values, *group, ReduceOp::Max);
      continue;
    }
    auto index = at::tensor(rows, at::TensorOptions().dtype(at::kLong)).to(values.device());
    values.index_copy_(0, index, all_reduce_raw(values.index_select(0, index), *group, ReduceOp::Max));
  }
}

/// One flat all-gather buffer: every member parameter's padded chunk, laid end to end.
struct GatherBucket {
  explicit GatherBucket(at::ScalarType dtype) : dtype(dtype) {}
  at::ScalarType dtype;
  int64_t flat_numel = 0;
  std::vector<size_t> members;       ///< indices into params_
  std::vector<int64_t> split_sizes;  ///< padded_numel of each member
  c10::intrusive_ptr<c10d::Work> work;
  at::Tensor input, output;          ///< [flat_numel], [world * flat_numel]
  std::vector<at::Tensor> sent;      ///< one rank: the members' shards as sent (no collective)
  /// The members' unsharded storage, laid end to end in member order: [sum of world *
  /// padded_numel]. Parameters registered next to each other are next to each other in memory
  /// while unsharded (without padding: rows divisible by the shard count), so linear layers
  /// reading one input run as one GEMM on them without a copy (titan::linear_fused).
  at::Tensor storage;
};

/// What this rank sends of each parameter: its shard, or the custom gather's form of it, whose
/// statistics (e.g. amaxes) are reduced first in one all-reduce per group.
inline std::vector<at::Tensor> shards_to_send(const std::vector<FsdpParam>& params,
                                              const ProcessGroupPtr& shard_group, const std::string& module_name) {
  std::vector<at::Tensor> sent;
  std::vector<at::Tensor> statistics;
  std::vector<size_t> owners;
  for (size_t i = 0; i < params.size(); ++i) {
    sent.push_back(params[i].sharded);
    if (!params[i].custom_gather) continue;
    auto statistic = params[i].custom_gather->shard_statistic(params[i].sharded);
    if (!statistic.defined()) continue;
    statistics.push_back(statistic.reshape({1}).to(at::kFloat));
    owners.push_back(i);
  }
  at::Tensor reduced;  // [statistics]
  if (!statistics.empty()) {
    reduced = at::cat(statistics);
    detail::max_over_groups(reduced, std::vector<ProcessGroupPtr>(owners.size(), shard_group));
    std::vector<ProcessGroupPtr> further;  // e.g. tensor parallel
    for (size_t i : owners) further.push_back(params[i].custom_gather->statistic_group());
    detail::max_over_groups(reduced, further);
  }
  for (size_t i = 0, k = 0; i < params.size(); ++i) {
    auto& p = params[i];
    if (!p.custom_gather) continue;
    const bool has = k < owners.size() && owners[k] == i;
    sent[i] = p.custom_gather->pre_all_gather(p.sharded, has ? reduced[static_cast<int64_t>(k)] : at::Tensor());
    if (has) ++k;
    TORCH_CHECK(sent[i].scalar_type() == p.custom_gather->gather_dtype() && sent[i].sizes() == p.sharded.sizes(),
                "titan::fully_shard: the custom gather of '", module_name, ".", p.names.front(), "' sent a ",
                sent[i].scalar_type(), " tensor of shape ", sent[i].sizes(), "; expected ",
                p.custom_gather->gather_dtype(), " of the shard's shape ", p.sharded.sizes());
  }
  return sent;
}

/// This rank's part of `bucket`'s all-gather, [flat_numel] in the bucket's dtype (`options`: the
/// device): each member's shard as sent (`sent`, indexed like `params`) at its gather offset.
inline at::Tensor all_gather_copy_in(const GatherBucket& bucket, const std::vector<FsdpParam>& params,
                                     const std::vector<at::Tensor>& sent, const at::TensorOptions& options) {
  // Padding rows stay uninitialised: they travel with the collective but are never read.
  auto input = at::empty({bucket.flat_numel}, options.dtype(bucket.dtype));  // [flat_numel]
  {
    RECORD_USER_SCOPE("titan::fsdp::all_gather_copy_in");
    std::vector<at::Tensor> slots, shards;
    for (size_t i : bucket.members) {
      const auto& p = params[i];
      if (p.sharded.numel() == 0) continue;
      slots.push_back(input.narrow(0, p.gather_offset, p.sharded.numel()).view(p.sharded.sizes()));
      shards.push_back(sent[i]);
    }
    if (!slots.empty()) at::_foreach_copy_(slots, shards);  // one foreach copy (and cast) per buffer
  }
  return input;
}

/// Starts `bucket`'s all-gather of `input` (this rank's part) over `group` (`world` ranks) into
/// bucket.output; bucket.work completes it.
inline void all_gather_async(GatherBucket& bucket, const at::Tensor& input, int world, const ProcessGroup& group) {
  bucket.input = input;
  bucket.output = at::empty({world * bucket.flat_numel}, input.options());  // [world * flat_numel]
  // On NCCL, c10d orders the collective after the current stream's work and records the
  // buffers on its stream; wait() makes the current stream wait for it.
  // Float8 travels as bytes (Gloo has no float8 type; an all-gather does no arithmetic).
  const bool bytes = c10::isFloat8Type(bucket.dtype);
  auto send = bytes ? input.view(at::kByte) : input, receive = bytes ? bucket.output.view(at::kByte) : bucket.output;
  bucket.work = group.backend()->_allgather_base(receive, send);
}

/// Points `bucket`'s members at their unsharded storage and copies the gathered chunks into it
/// (`world` == 1: the shards as sent), then frees the bucket's collective buffers.
inline void all_gather_copy_out(GatherBucket& bucket, std::vector<FsdpParam>& params, int world) {
  std::vector<at::Tensor> chunks;  // each parameter's storage as [world, padded_numel]
  for (size_t i : bucket.members) {
    auto& p = params[i];
    // A custom gather's member is the placeholder (of this device: the model may have been
    // sharded on meta): its hook computes from the gathered form, the gradient reaches it.
    detail::repoint_tensor(p.unsharded, p.custom_gather ? p.placeholder : p.full());
    chunks.push_back(detail::storage_alias(p.storage).view({world, p.padded_numel()}));
  }
  if (world == 1) {
    std::vector<at::Tensor> shards;  // cast to the gathered dtype
    for (size_t k = 0; k < bucket.members.size(); ++k)
      shards.push_back(bucket.sent[k].view({1, params[bucket.members[k]].padded_numel()}));
    at::_foreach_copy_(chunks, shards);
    bucket.sent.clear();
  } else {
    // Column block k of the [world, flat_numel] output is member k's padded chunks in rank
    // order, which is the parameter followed by its padding (torch.chunk puts the short chunks last).
    at::split_with_sizes_copy_out(chunks, bucket.output.view({world, bucket.flat_numel}), bucket.split_sizes, 1);
  }
  bucket.input = at::Tensor();
  bucket.output = at::Tensor();
}

/// One rank, no replicas: moves each unsharded gradient to its shard's .grad (in `dtype` first when
/// a reduction would round through it) and frees it; no collective. With `keep_compute_dtype`
/// (FsdpOptions::keep_compute_copy) a gradient the cast would only widen becomes the .grad as it is
/// (the same values), unless the .grad already holds one (accumulation: widened, then added).
inline void reduce_on_one_rank(std::vector<FsdpParam>& params, at::ScalarType dtype, bool keep_compute_dtype) {
  std::vector<FsdpParam*> cast_params;
  std::vector<at::Tensor> casts, grads;
  for (auto& p : params) {
    auto& grad = p.unsharded.mutable_grad();
    const auto target = p.sharded.scalar_type();
    const bool one_cast = grad.defined() && grad.scalar_type() != target &&
                          (dtype == grad.scalar_type() || dtype == target);
    if (p.sharded.requires_grad() && one_cast && keep_compute_dtype && !p.sharded.grad().defined()) {
      p.sharded.mutable_grad() = grad.contiguous();
    } else if (p.sharded.requires_grad() && one_cast) {
      cast_params.push_back(&p);
      casts.push_back(at::empty(grad.sizes(), grad.options().dtype(target)));
      grads.push_back(grad);
    } else if (p.sharded.requires_grad()) {
      accumulate_grad(p, grad.defined() ? grad.to(dtype).to(target) : at::zeros_like(p.sharded));
    }
    grad = at::Tensor();  // the unsharded gradient is freed
  }
  if (!casts.empty()) {
    RECORD_USER_SCOPE("titan::fsdp::reduce_scatter_copy_in");
    at::_foreach_copy_(casts, grads);
  }
  for (size_t i = 0; i < casts.size(); ++i) accumulate_grad(*cast_params[i], casts[i]);
}

/// The reduce-scatter's input [world * flat_numel] in `dtype` (`options`: the device): every
/// parameter's unsharded gradient, chunked by rank; the unsharded gradients are freed.
inline at::Tensor reduce_scatter_copy_in(std::vector<FsdpParam>& params, int world, int64_t flat_numel,
                                         const at::TensorOptions& options, at::ScalarType dtype) {
  auto input = at::empty({world * flat_numel}, options.dtype(dtype));  // [world * flat_numel]
  {
    RECORD_USER_SCOPE("titan::fsdp::reduce_scatter_copy_in");
    // Row r of [world, flat_numel] is rank r's padded chunk of every gradient, zero-padded; an
    // unused parameter contributes zeros.
    std::vector<at::Tensor> grads;
    for (auto& p : params) {
      auto& grad = p.unsharded.mutable_grad();
      grads.push_back(!grad.defined() ? at::zeros(p.shape, input.options())
                      : grad.scalar_type() == dtype ? grad : grad.to(dtype));
      grad = at::Tensor();  // the unsharded gradient is freed once copied
    }
    auto rows = input.view({world, flat_numel});  // [world, flat_numel]
    at::_chunk_cat_out(rows, grads, 0, world);
  }
  return input;
}

/// Adds this rank's block of the reduced gradients (`out`, [flat_numel]) to each sharded
/// parameter's .grad.
inline void reduce_scatter_copy_out(std::vector<FsdpParam>& params, const at::Tensor& out, int rank) {
  for (auto& p : params) {
    if (!p.sharded.requires_grad()) continue;
    auto local_rows = p.rows[static_cast<size_t>(rank)];
    auto shape = p.shape;
    shape[0] = local_rows;
    // The reduction's output, shared (it lives as long as a gradient uses it), or one cast.
    auto grad = out.narrow(0, p.flat_offset, local_rows * p.row_numel).view(shape);
    accumulate_grad(p, grad.scalar_type() == p.sharded.scalar_type() ? detail::storage_alias(grad)
                                                                       : grad.to(p.sharded.scalar_type()));
  }
}

}  // namespace detail
}  // namespace titan
