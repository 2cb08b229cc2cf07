#pragma once
// titan/sharding.hpp: how a local tensor relates to the global one (titan's stand-in for DTensor),
// and what follows from it: sharded and full state dicts, and the memory a rank holds.
//
// A TensorLayout is the global shape plus the shard levels applied to it, outermost first. Each
// level splits one tensor dimension across one process group the way torch.chunk does
// (titan::chunk_sizes: uneven sizes allowed), or, for a fused projection ([q|k|v] stacked along
// dim 0), splits each stacked part that way (ShardLevel::parts). Every rank's piece is then one
// rectangle of the global tensor, or a few (fused), which is what checkpoints record and reshard
// by. Example: a 2-D FSDP x TP column-parallel weight [out, in] is {Shard(0) over "tp",
// Shard(0) over "dp_shard"}.
//
//   auto shards = titan::sharded_parameters(model);             // local tensors + layouts
//   auto full = titan::full_state_dict(model, world->group());   // gathered, on rank 0
//   titan::load_full_state_dict(model, full);                    // each rank copies its blocks
//   auto memory = titan::memory_usage(model, &optimizer);        // bytes this rank holds

#include <titan/collectives.hpp>
#include <titan/detail/optimizer_state.hpp>
#include <titan/hooks.hpp>
#include <titan/world.hpp>

#include <torch/arg.h>
#include <torch/optim/optimizer.h>

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace titan {

/// One split of tensor dimension `dim` across `group` (named `mesh_dim` in the DeviceMesh).
struct ShardLevel {
  int64_t dim = 0;
  std::string mesh_dim;
  ProcessGroupPtr group;
  /// Empty: the dimension is split as a whole (Shard(dim)). Otherwise the dimension is these
  /// parts laid end to end (sizes along `dim`, summing to its size) and each part is split across
  /// the group; rank r holds chunk r of every part, concatenated (a fused [q|k|v] projection).
  std::vector<int64_t> parts;
};

/// Where rank `rank` of `ranks` holds one part of a fused dimension (ShardLevel::parts).
struct PartExtent {
  int64_t global_offset = 0;  ///< the rank's chunk of the part, in the whole dimension
  int64_t size = 0;           ///< its length
  int64_t local_offset = 0;   ///< where it starts in the rank's local tensor
};

/// Rank `rank`'s chunks of `parts` (sizes laid end to end along one dimension, each split across
/// `ranks` by chunk_sizes): one extent per part, and their total (the rank's local length).
struct FusedExtents {
  std::vector<PartExtent> parts;
  int64_t local_size = 0;
};

inline FusedExtents fused_extents(const std::vector<int64_t>& parts, int64_t ranks, int64_t rank) {
  FusedExtents extents;
  int64_t part_start = 0;
  for (auto part : parts) {
    const auto sizes = chunk_sizes(part, ranks);
    const int64_t size = sizes[static_cast<size_t>(rank)];
    extents.parts.push_back(PartExtent{part_start + chunk_offset(sizes, rank), size, extents.local_size});
    extents.local_size += size;
    part_start += part;
  }
  return extents;
}

/// A rectangle of a tensor: where it starts and how large it is, per dimension.
struct TensorBox {
  std::vector<int64_t> offsets;
  std::vector<int64_t> sizes;
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : sizes) n *= s;
    return n;
  }
};

/// A rectangle of the global tensor that this rank holds, and where it sits in the local tensor.
struct TensorBlock {
  TensorBox box;                       ///< in the global tensor
  std::vector<int64_t> local_offsets;  ///< of its first element in the local tensor
  /// The block's elements in `local` (a view).
  at::Tensor view_of(const at::Tensor& local) const {
    at::Tensor view = local;
    for (size_t d = 0; d < box.sizes.size(); ++d)
      view = view.narrow(static_cast<int64_t>(d), local_offsets[d], box.sizes[d]);
    return view;
  }
  /// The block's elements in `global` (a view of the whole tensor).
  at::Tensor view_of_global(const at::Tensor& global) const {
    at::Tensor view = global;
    for (size_t d = 0; d < box.sizes.size(); ++d) view = view.narrow(static_cast<int64_t>(d), box.offsets[d], box.sizes[d]);
    return view;
  }
};

namespace detail {

/// A run of global indices [offset, offset + size) along one dimension.
struct Segment {
  int64_t offset;
  int64_t size;
};

/// The global runs that local indices [begin, begin + size) of `segments` (laid end to end) cover.
/// An empty range is one empty run at the global index where it would start (as torch.chunk's
/// empty trailing chunks start at the end).
inline std::vector<Segment> slice_segments(const std::vector<Segment>& segments, int64_t begin, int64_t size) {
  std::vector<Segment> result;
  int64_t position = 0;
  for (const auto& segment : segments) {
    if (size == 0 && begin < position + segment.size) return {Segment{segment.offset + (begin - position), 0}};
    const int64_t lo = std::max(begin, position), hi = std::min(begin + size, position + segment.size);
    if (lo < hi) result.push_back(Segment{segment.offset + (lo - position), hi - lo});
    position += segment.size;
  }
  if (size == 0) return {Segment{segments.empty() ? 0 : segments.back().offset + segments.back().size, 0}};
  return result;
}

inline int64_t segments_size(const std::vector<Segment>& segments) {
  int64_t total = 0;
  for (const auto& s : segments) total += s.size;
  return total;
}

}  // namespace detail

/// The global shape of a tensor and how it is sharded, outermost level first.
struct TensorLayout {
  std::vector<int64_t> global_shape;
  std::vector<ShardLevel> levels;

  /// This rank's rectangles of the global tensor, in local order (one unless a level has parts).
  std::vector<TensorBlock> local_blocks() const {
    const size_t ndim = global_shape.size();
    std::vector<std::vector<detail::Segment>> dims(ndim);  // per dim: global runs in local order
    for (size_t d = 0; d < ndim; ++d) dims[d] = {detail::Segment{0, global_shape[d]}};
    for (const auto& level : levels) {
      TORCH_CHECK(level.dim >= 0 && level.dim < static_cast<int64_t>(ndim), "titan: shard level on dim ", level.dim,
                  " of a tensor of rank ", ndim);
      TORCH_CHECK(level.group, "titan: shard level over '", level.mesh_dim, "' has no group on this rank");
      auto& runs = dims[static_cast<size_t>(level.dim)];
      const int64_t length = detail::segments_size(runs);
      auto parts = level.parts.empty() ? std::vector<int64_t>{length} : level.parts;
      int64_t total = 0;
      for (auto p : parts) total += p;
      TORCH_CHECK(total == length, "titan: shard level over '", level.mesh_dim, "' splits parts of ",
                  c10::IntArrayRef(parts), " summing to ", total, " but dimension ", level.dim, " has ", length);
      std::vector<detail::Segment> mine;
      for (const auto& extent : fused_extents(parts, level.group->size(), level.group->rank()).parts) {
        auto piece = detail::slice_segments(runs, extent.global_offset, extent.size);
        for (const auto& run : piece) {  // adjacent runs merge: one rectangle where possible
          if (!mine.empty() && mine.back().offset + mine.back().size == run.offset) {
            mine.back().size += run.size;
          } else {
            mine.push_back(run);
          }
        }
      }
      // Empty runs only place an empty piece: keep one when that is all this rank holds.
      std::vector<detail::Segment> held;
      for (const auto& run : mine)
        if (run.size > 0) held.push_back(run);
      runs = held.empty() ? std::vector<detail::Segment>{mine.front()} : std::move(held);
    }
    std::vector<TensorBlock> blocks{TensorBlock{TensorBox{{}, {}}, {}}};
    for (size_t d = 0; d < ndim; ++d) {
      std::vector<TensorBlock> next;
      for (const auto& block : blocks) {
        int64_t local = 0;
        for (const auto& run : dims[d]) {
          TensorBlock grown = block;
          grown.box.offsets.push_back(run.offset);
          grown.box.sizes.push_back(run.size);
          grown.local_offsets.push_back(local);
          next.push_back(std::move(grown));
          local += run.size;
        }
      }
      blocks = std::move(next);
    }
    return blocks;
  }

  /// The shape of this rank's local tensor.
  std::vector<int64_t> local_shape() const {
    auto blocks = local_blocks();
    std::vector<int64_t> shape(global_shape.size(), 0);
    for (const auto& block : blocks)
      for (size_t d = 0; d < shape.size(); ++d)
        shape[d] = std::max(shape[d], block.local_offsets[d] + block.box.sizes[d]);
    return shape;
  }

  /// This rank's rectangle of the global tensor, for layouts without fused (parts) levels.
  TensorBox local_box() const {
    auto blocks = local_blocks();
    TORCH_CHECK(blocks.size() == 1, "titan: the layout ", placement(), " gives this rank ", blocks.size(),
                " rectangles of the tensor (a fused level); use local_blocks()");
    return blocks.front().box;
  }

  /// "Shard(0)@tp,Shard(0)@dp_shard", "Shard(0)[3 parts]@tp", or "Replicate" with no levels: for
  /// metadata and messages.
  std::string placement() const {
    if (levels.empty()) return "Replicate";
    std::string text;
    for (const auto& level : levels) {
      text += (text.empty() ? "" : ",") + std::string("Shard(") + std::to_string(level.dim) + ")";
      if (!level.parts.empty()) text += "[" + std::to_string(level.parts.size()) + " parts]";
      text += "@" + level.mesh_dim;
    }
    return text;
  }

  /// The same layout with one more (innermost) level.
  TensorLayout with_level(ShardLevel level) const {
    TensorLayout layout = *this;
    layout.levels.push_back(std::move(level));
    return layout;
  }
};

/// A local tensor with its place in the global tensor: what sharded state dicts hold.
struct ShardedTensor {
  at::Tensor local;                  ///< this rank's piece, unpadded, shape == layout.local_shape()
  TensorLayout layout;               ///< global shape and shard levels
  std::vector<TensorBlock> blocks;   ///< layout.local_blocks(), cached

  /// The one rectangle of a tensor without fused levels.
  const TensorBox& box() const {
    TORCH_CHECK(blocks.size() == 1, "titan: the layout ", layout.placement(), " gives this rank ", blocks.size(),
                " rectangles (a fused level); use blocks");
    return blocks.front().box;
  }
};

/// Named sharded tensors in a stable order (module registration order).
using ShardedStateDict = std::vector<std::pair<std::string, ShardedTensor>>;

/// `local` with `layout`, checking that the local shape is the one the layout gives.
inline ShardedTensor make_sharded(const std::string& name, const at::Tensor& local, TensorLayout layout) {
  auto blocks = layout.local_blocks();
  ShardedTensor sharded{local, std::move(layout), std::move(blocks)};
  auto shape = sharded.layout.local_shape();
  TORCH_CHECK(shape == local.sizes().vec(), "titan: '", name, "' has local shape ", local.sizes(), " but its layout ",
              sharded.layout.placement(), " gives ", c10::IntArrayRef(shape));
  return sharded;
}

/// A replicated (unsharded) tensor as a ShardedTensor.
inline ShardedTensor replicated(const at::Tensor& tensor) {
  return make_sharded("replicated tensor", tensor, TensorLayout{tensor.sizes().vec(), {}});
}

/// Implemented by hooks that change how parameters are stored (tensor parallel, FSDP). A hook on
/// module M answers for the parameters M's subtree holds, named relative to M ("wq.weight").
/// A hook that shards parameters already sharded by an inner hook (FSDP over TP) includes the inner
/// levels in its answer.
class ParameterLayoutProvider {
 public:
  virtual ~ParameterLayoutProvider() = default;
  /// The layout of parameter `relative_name`, or nullopt if this hook does not manage it.
  virtual std::optional<TensorLayout> layout_of(const std::string& relative_name) const = 0;
  /// Bytes this hook holds beyond the local shards right now (FSDP: unsharded parameters and
  /// gradients), for memory_usage.
  virtual int64_t unsharded_bytes() const { return 0; }
};

/// The layout of `module`'s parameter `name` (a dotted name from named_parameters): the answer of
/// the provider hook on the shortest module prefix that manages it (on one module, the outermost
/// hook first), else replicated.
inline TensorLayout parameter_layout(const torch::nn::Module& module, const std::string& name,
                                     const at::Tensor& parameter) {
  const torch::nn::Module* current = &module;
  std::string rest = name;
  while (current != nullptr) {
    // Outermost hook first: an outer provider (FSDP) already composes what inner ones (TP) report.
    if (const auto* slot = detail::hook_slot(*current)) {
      for (auto hook = slot->hooks.rbegin(); hook != slot->hooks.rend(); ++hook) {
        if (auto provider = std::dynamic_pointer_cast<ParameterLayoutProvider>(*hook)) {
          if (auto layout = provider->layout_of(rest)) return *layout;
        }
      }
    }
    auto dot = rest.find('.');
    if (dot == std::string::npos) break;
    const auto* child = detail::child_dict(*current).find(rest.substr(0, dot));
    current = child ? child->get() : nullptr;
    rest = rest.substr(dot + 1);
  }
  return TensorLayout{parameter.sizes().vec(), {}};
}

/// Every parameter of `module` (a module, ModuleHolder, shared_ptr or pointer; local tensors as
/// optimizers see them) with its global layout.
template <typename M>
ShardedStateDict sharded_parameters(const M& module_like) {
  const torch::nn::Module& module = detail::module_ref(module_like);
  ShardedStateDict result;
  for (const auto& item : module.named_parameters(/*recurse=*/true))
    result.emplace_back(item.key(),
                        make_sharded("parameter '" + item.key() + "'", item.value(),
                                     parameter_layout(module, item.key(), item.value())));
  return result;
}

/// Options of full_state_dict, with chained setters.
struct FullStateDictOptions {
  /// Only rank 0 of the given group keeps the gathered tensors (every rank still takes part in
  /// the gathers); the others get an empty dict.
  TORCH_ARG(bool, rank0_only) = true;
  /// Copy the gathered tensors to the CPU.
  TORCH_ARG(bool, cpu_offload) = true;
};

/// The global tensor of a sharded one: all-gathers its levels, innermost first. Every rank of
/// each level's group must call it.
inline at::Tensor gather_full(const ShardedTensor& sharded) {
  const auto& levels = sharded.layout.levels;
  // Size along each level's dim before that level split it.
  std::vector<int64_t> before(levels.size());
  std::vector<int64_t> sizes = sharded.layout.global_shape;
  for (size_t k = 0; k < levels.size(); ++k) {
    auto d = static_cast<size_t>(levels[k].dim);
    before[k] = sizes[d];
    sizes[d] = fused_extents(levels[k].parts.empty() ? std::vector<int64_t>{sizes[d]} : levels[k].parts,
                             levels[k].group->size(), levels[k].group->rank())
                   .local_size;
  }
  at::NoGradGuard no_grad;
  at::Tensor full = sharded.local.detach();
  for (size_t k = levels.size(); k-- > 0;) {
    const auto& level = levels[k];
    const int n = level.group->size();
    if (level.parts.empty()) {
      full = detail::all_gather_raw(full, *level.group, level.dim, chunk_sizes(before[k], n));
      continue;
    }
    // Rank r holds [chunk r of part 0 | chunk r of part 1 | ...]: gather, then regroup by part.
    std::vector<FusedExtents> of_rank;
    std::vector<int64_t> per_rank;
    for (int r = 0; r < n; ++r) {
      of_rank.push_back(fused_extents(level.parts, n, r));
      per_rank.push_back(of_rank.back().local_size);
    }
    auto gathered = detail::all_gather_raw(full, *level.group, level.dim, per_rank);
    std::vector<at::Tensor> pieces;
    for (size_t i = 0; i < level.parts.size(); ++i) {
      for (int r = 0; r < n; ++r) {
        const auto& extent = of_rank[static_cast<size_t>(r)].parts[i];
        pieces.push_back(gathered.narrow(level.dim, chunk_offset(per_rank, r) + extent.local_offset, extent.size));
      }
    }
    full = at::cat(pieces, level.dim);
  }
  return full;
}

/// Every parameter (gathered to its global shape) and buffer of `module` (a module, ModuleHolder,
/// shared_ptr or pointer), by name: a plain state dict for export or for a single-process model.
/// Every rank of `group` (normally the world group) calls it; `group` says which rank is rank 0
/// for rank0_only.
template <typename M>
torch::OrderedDict<std::string, at::Tensor> full_state_dict(const M& module_like, const ProcessGroupPtr& group,
                                                            const FullStateDictOptions& options = {}) {
  const torch::nn::Module& module = detail::module_ref(module_like);
  detail::check_group(group, "full_state_dict");
  torch::OrderedDict<std::string, at::Tensor> result;
  const bool keep = !options.rank0_only() || group->rank() == 0;
  auto add = [&](const std::string& name, const at::Tensor& tensor) {
    if (!keep) return;
    auto copy = tensor.detach().clone();
    result.insert(name, options.cpu_offload() ? copy.cpu() : copy);
  };
  for (const auto& [name, sharded] : sharded_parameters(module)) add(name, gather_full(sharded));
  for (const auto& item : module.named_buffers(true)) add(item.key(), item.value());
  return result;
}

/// Loads a full (unsharded) state dict, e.g. from full_state_dict or a single-process model, into
/// the local shards and buffers of `module` (a module, ModuleHolder, shared_ptr or pointer).
/// Every parameter and buffer must be present with its global shape.
template <typename M>
void load_full_state_dict(M&& module_like, const torch::OrderedDict<std::string, at::Tensor>& state) {
  torch::nn::Module& module = detail::module_ref(module_like);
  at::NoGradGuard no_grad;
  for (auto& [name, sharded] : sharded_parameters(module)) {
    const at::Tensor* full = state.find(name);
    TORCH_CHECK(full != nullptr, "titan::load_full_state_dict: no entry for parameter '", name, "'");
    TORCH_CHECK(full->sizes().vec() == sharded.layout.global_shape, "titan::load_full_state_dict: '", name,
                "' has shape ", full->sizes(), " but the model's global shape is ",
                c10::IntArrayRef(sharded.layout.global_shape));
    for (const auto& block : sharded.blocks) block.view_of(sharded.local).copy_(block.view_of_global(*full));
  }
  for (auto& item : module.named_buffers(true)) {
    const at::Tensor* full = state.find(item.key());
    TORCH_CHECK(full != nullptr, "titan::load_full_state_dict: no entry for buffer '", item.key(), "'");
    item.value().copy_(*full);
  }
}

namespace detail {

/// The gradients of `module`'s parameters that have one, and for each how many ranks of `group`
/// hold the same block (see grad_norm).
inline std::vector<std::pair<at::Tensor, int64_t>> gradients_with_copies(torch::nn::Module& module,
                                                                        const ProcessGroupPtr& group,
                                                                        const ProcessGroupPtr& pipeline_group,
                                                                        const char* caller) {
  detail::check_group(group, caller);
  const auto& members = group->global_ranks();
  std::vector<const ProcessGroup*> checked;  // level groups known to lie inside `group`
  std::vector<std::pair<at::Tensor, int64_t>> result;
  for (const auto& [name, sharded] : sharded_parameters(module)) {
    const auto& grad = sharded.local.grad();
    if (!grad.defined()) continue;
    int64_t split = 1;  // ranks of `group` holding distinct blocks of this parameter
    for (const auto& level : sharded.layout.levels) {
      if (std::find(checked.begin(), checked.end(), level.group.get()) == checked.end()) {
        for (int rank : level.group->global_ranks())
          TORCH_CHECK(std::find(members.begin(), members.end(), rank) != members.end(), "titan::", caller,
                      ": parameter '", name, "' is sharded over '", level.mesh_dim, "', whose rank ", rank,
                      " is outside the given group of ", group->size(), " ranks: pass a group holding every shard ",
                      "(the world group)");
        checked.push_back(level.group.get());
      }
      split *= level.group->size();
    }
    split *= pipeline_group ? pipeline_group->size() : 1;  // other stages hold other parameters
    TORCH_CHECK(group->size() % split == 0, "titan::", caller, ": parameter '", name, "' is split into ", split,
                " blocks (pipeline stages included), which the group's ", group->size(),
                " ranks cannot hold equally often");
    result.emplace_back(grad.detach(), group->size() / split);
  }
  return result;
}

/// The global L2 norm over `group` of `grads`, each with the number of ranks holding it
/// (gradients_with_copies): see grad_norm.
inline at::Tensor norm_of_gradients(const std::vector<std::pair<at::Tensor, int64_t>>& grads,
                                    const ProcessGroupPtr& group) {
  at::NoGradGuard no_grad;
  // Each gradient's norm comes from one foreach kernel per (device, dtype, copies) bucket, in
  // fp32 or wider; only the per-tensor norms are squared and summed in fp64.
  std::map<std::tuple<std::string, at::ScalarType, int64_t>, std::vector<at::Tensor>> buckets;
  for (const auto& [grad, copies] : grads) buckets[{grad.device().str(), grad.scalar_type(), copies}].push_back(grad);
  auto squared = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(group->device()));  // []
  for (const auto& [key, bucket] : buckets) {
    const auto dtype = std::get<1>(key);
    const bool narrow = dtype == at::kBFloat16 || dtype == at::kHalf;
    auto norms = at::_foreach_norm(bucket, 2, narrow ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt);
    auto sum = at::stack(norms).to(at::kDouble).pow(2).sum();  // []
    squared += sum.to(squared.device()) / static_cast<double>(std::get<2>(key));
  }
  return detail::all_reduce_raw(squared, *group, ReduceOp::Sum).sqrt();  // []
}

}  // namespace detail

/// The global L2 norm of the gradients of `module`'s parameters (a module, ModuleHolder,
/// shared_ptr or pointer), as torch.nn.utils.clip_grad_norm_ computes it for the unsharded model:
/// a 0-dim float64 tensor on the group's device. The norm counts every element of every global
/// parameter once, from the layouts: a block several ranks of `group` hold (a norm weight
/// replicated over TP, an HSDP replica) is counted once. `group` must contain the groups of every
/// shard level (the world group always does) and every rank of it calls this. With pipeline
/// parallelism `module` is this rank's stage(s): pass the pipeline group as `pipeline_group` and a
/// `group` spanning every stage (the world group), so each stage's blocks count once.
template <typename M>
at::Tensor grad_norm(M&& module_like, const ProcessGroupPtr& group, const ProcessGroupPtr& pipeline_group = nullptr) {
  torch::nn::Module& module = detail::module_ref(module_like);
  return detail::norm_of_gradients(detail::gradients_with_copies(module, group, pipeline_group, "grad_norm"), group);
}

/// The factor clipping multiplies the gradients by for a global gradient norm `norm` (0-dim):
/// max_norm / (norm + 1e-6) capped at 1, as torch.nn.utils.clip_grad_norm_, and 1 where the norm
/// is not finite (the gradients are left as they are; the step is typically skipped). Same dtype
/// and device as `norm`.
inline at::Tensor clip_coefficient(const at::Tensor& norm, double max_norm) {
  TORCH_CHECK(max_norm > 0, "titan::clip_coefficient: max_norm must be positive, got ", max_norm);
  auto coefficient = (max_norm / (norm + 1e-6)).clamp_max(1.0);  // []
  return at::where(norm.isfinite(), coefficient, at::ones_like(coefficient));
}

/// Scales the gradients of the parameters of `module` (a module, ModuleHolder, shared_ptr or
/// pointer) so that their global L2 norm is at most `max_norm`, as torch.nn.utils.clip_grad_norm_
/// does for an unsharded model, and returns the norm before clipping (grad_norm, whose arguments
/// these are). max_norm <= 0 only measures; a non-finite norm leaves the gradients unchanged
/// (clip_coefficient). An optimizer that can scale the gradients inside its own kernel (the
/// examples' FusedAdamW) takes grad_norm and clip_coefficient instead and saves the pass over
/// the gradients.
template <typename M>
at::Tensor clip_grad_norm_(M&& module_like, double max_norm, const ProcessGroupPtr& group,
                           const ProcessGroupPtr& pipeline_group = nullptr) {
  torch::nn::Module& module = detail::module_ref(module_like);
  const auto grads = detail::gradients_with_copies(module, group, pipeline_group, "clip_grad_norm_");
  auto norm = detail::norm_of_gradients(grads, group);  // []
  if (max_norm <= 0) return norm;
  at::NoGradGuard no_grad;
  const auto coefficient = clip_coefficient(norm, max_norm);  // []
  std::map<std::pair<std::string, at::ScalarType>, std::vector<at::Tensor>> by_device;
  for (const auto& [grad, copies] : grads)
    by_device[{grad.device().str(), grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat}].push_back(grad);
  for (auto& [key, grads] : by_device)
    at::_foreach_mul_(grads, coefficient.to(grads.front().device(), key.second));
  return norm;
}

/// Per-rank bytes held for a model and its optimizer.
struct MemoryUsage {
  int64_t param_bytes = 0;            ///< parameters as the optimizer sees them (local shards)
  int64_t grad_bytes = 0;             ///< their gradients
  int64_t optimizer_state_bytes = 0;  ///< optimizer state tensors of those parameters
  int64_t unsharded_bytes = 0;        ///< unsharded parameters and gradients currently allocated (FSDP)
  int64_t global_param_bytes = 0;     ///< all parameters unsharded (what one replica would hold)
};

namespace detail {
inline int64_t tensor_bytes(const at::Tensor& t) {
  return t.defined() && !t.is_meta() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
}
}  // namespace detail

/// What this rank holds for `module` (a module, ModuleHolder, shared_ptr or pointer; sharded or
/// not) and, when given, `optimizer`'s state (Adam, AdamW, SGD, Adagrad or RMSprop).
template <typename M>
MemoryUsage memory_usage(const M& module_like, const torch::optim::Optimizer* optimizer = nullptr) {
  const torch::nn::Module& module = detail::module_ref(module_like);
  MemoryUsage memory;
  for (const auto& item : module.named_parameters(true)) {
    memory.param_bytes += detail::tensor_bytes(item.value());
    memory.grad_bytes += detail::tensor_bytes(item.value().grad());
    memory.global_param_bytes += c10::multiply_integers(parameter_layout(module, item.key(), item.value()).global_shape) *
                                 static_cast<int64_t>(item.value().element_size());
  }
  detail::visit_modules(module, "", [&memory](const std::string&, const torch::nn::Module& m) {
    for (const auto& hook : hooks_of(m))
      if (auto provider = std::dynamic_pointer_cast<ParameterLayoutProvider>(hook))
        memory.unsharded_bytes += provider->unsharded_bytes();
  });
  if (optimizer != nullptr) {
    for (const auto& entry : optimizer->state()) {
      const auto& kind = detail::optimizer_kind_of_state(*entry.second, "titan::memory_usage");
      for (const auto& [key, tensor] : kind.tensors(*entry.second)) memory.optimizer_state_bytes += detail::tensor_bytes(tensor);
    }
  }
  return memory;
}

}  // namespace titan
