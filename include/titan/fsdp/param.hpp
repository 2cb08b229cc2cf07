#pragma once
// titan/fsdp/param.hpp: one parameter of a fully_shard unit: its sharded and unsharded storage and
// layout, and the extension that gathers it in another form (FSDP2's _fsdp_param.py).

#include <titan/hooks.hpp>
#include <titan/sharding.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace titan {

/// A parameter that FSDP all-gathers in another form than its values (FSDP2's
/// fsdp_pre_all_gather / fsdp_post_all_gather extension): float8 weights cast with a scale from the
/// global amax (titan/float8.hpp). A hook on the module that owns the parameter provides it
/// (FsdpGatherProvider) before fully_shard runs. The module's member then stays FSDP's placeholder:
/// the hook computes from what post_all_gather handed it, and the gradient still reaches the member.
class FsdpParamGather {
 public:
  virtual ~FsdpParamGather() = default;
  /// The dtype the parameter is all-gathered and kept unsharded in.
  virtual at::ScalarType gather_dtype() const = 0;
  /// A statistic of this rank's shard that must be reduced (maximum) over every rank holding a
  /// piece of the parameter before the cast, e.g. its amax: a 0-dim float32 tensor; undefined
  /// when nothing needs reducing (a precomputed scale). FSDP reduces the unit's statistics in one
  /// all-reduce over its shard group (and one over statistic_group()).
  virtual at::Tensor shard_statistic(const at::Tensor& shard) = 0;
  /// A further group the parameter is sharded over (tensor parallel), or null.
  virtual ProcessGroupPtr statistic_group() const { return nullptr; }
  /// This rank's shard as sent, in gather_dtype() and the shard's shape, given the statistic reduced
  /// over all ranks (undefined when shard_statistic was).
  virtual at::Tensor pre_all_gather(const at::Tensor& shard, const at::Tensor& reduced_statistic) = 0;
  /// The gathered parameter, [global shape] in gather_dtype(): valid until post_reshard.
  virtual void post_all_gather(const at::Tensor& full) = 0;
  /// The unit freed the gathered parameter.
  virtual void post_reshard() = 0;
};

/// Implemented by hooks that have FSDP gather some of their module's parameters in another form.
class FsdpGatherProvider {
 public:
  virtual ~FsdpGatherProvider() = default;
  /// The gather for the module's parameter `key` (e.g. "weight"), or nullptr for a plain one.
  virtual std::shared_ptr<FsdpParamGather> fsdp_gather(const std::string& key) = 0;
};

/// One parameter managed by a unit (FsdpHook::Param).
struct FsdpParam {
  std::vector<std::string> names;  ///< names relative to the unit (several when tied in the unit)
  std::vector<std::pair<torch::nn::Module*, std::string>> owners;  ///< dictionary entries
  at::Tensor unsharded;            ///< the member handle (original TensorImpl), full shape
  /// The unsharded storage (an alias of the member while unsharded): this parameter's part of its
  /// gather bucket's storage, which is resized to 0 bytes when resharded and back to full size for
  /// the next all-gather. Tensors autograd saved from the member share the StorageImpl, so they
  /// are valid again whenever it is unsharded.
  at::Tensor storage;
  /// What the member points at while resharded: one zero element expanded to the full shape
  /// (strides 0). A unit called without titan::call then computes with zeros instead of reading
  /// freed memory, and titan::call reports it.
  at::Tensor placeholder;
  /// A placeholder of `member_dtype` (the compute dtype) on `device`.
  void make_placeholder(const at::Device& device, at::ScalarType member_dtype) {
    placeholder = at::zeros({1}, at::TensorOptions().dtype(member_dtype).device(device)).expand(shape);
  }
  /// The unsharded parameter's elements in `storage`, [shape].
  at::Tensor full() const { return storage.narrow(0, 0, c10::multiply_integers(shape)).view(shape); }
  at::Tensor sharded;              ///< the dictionary entry: this rank's dim-0 chunk, unpadded
  std::vector<int64_t> shape;      ///< global (unsharded) shape
  int64_t row_numel = 1;           ///< elements per dim-0 row
  int64_t padded_rows = 0;         ///< rows of every rank's padded chunk
  std::vector<int64_t> rows;       ///< rows of each rank's chunk (chunk_sizes)
  int64_t flat_offset = 0;         ///< offset of this parameter in a rank's flat buffer
  TensorLayout layout;             ///< global layout of `sharded` (inner levels + Shard(0))
  /// Gathered in another form (float8), or null: gathered in the compute dtype.
  std::shared_ptr<FsdpParamGather> custom_gather;
  size_t bucket = 0;               ///< which all-gather buffer carries it
  int64_t gather_offset = 0;       ///< its offset in a rank's part of that buffer
  int64_t padded_numel() const { return padded_rows * row_numel; }
};

namespace detail {

/// Adds `grad` (this rank's reduced block, the sharded parameter's dtype) to the sharded .grad; a
/// .grad kept in the compute dtype (FsdpOptions::keep_compute_copy) is widened first.
inline void accumulate_grad(FsdpParam& p, at::Tensor grad) {
  auto& slot = p.sharded.mutable_grad();
  if (slot.defined() && slot.scalar_type() != grad.scalar_type()) {
    slot = slot.to(grad.scalar_type()).add_(grad);
  } else if (slot.defined()) {
    slot.add_(grad);
  } else {
    slot = grad.contiguous();
  }
}

/// What a hook on `owner` asks FSDP to gather its parameter `key` as, or nullptr.
inline std::shared_ptr<FsdpParamGather> custom_gather(torch::nn::Module& owner, const std::string& key) {
  for (const auto& hook : hooks_of(owner))
    if (auto* provider = dynamic_cast<FsdpGatherProvider*>(hook.get()))
      if (auto gather = provider->fsdp_gather(key)) return gather;
  return nullptr;
}

}  // namespace detail
}  // namespace titan
