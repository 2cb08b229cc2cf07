#pragma once
// titan/sharding.hpp: how a local tensor relates to the global one (titan's stand-in for DTensor).
//
// A TensorLayout is the global shape plus the shard levels applied to it, outermost first. Each
// level splits one tensor dimension across one process group the way torch.chunk does
// (titan::chunk_sizes: uneven sizes allowed). Every rank's block is then a rectangle of the global
// tensor (offsets + sizes), which is what checkpoints record and reshard by. Example: a 2-D
// FSDP x TP column-parallel weight [out, in] is {Shard(0) over "tp", Shard(0) over "dp_shard"}.

#include <titan/collectives.hpp>
#include <titan/hooks.hpp>
#include <titan/world.hpp>

#include <optional>

#include <string>
#include <utility>
#include <vector>

namespace titan {

/// One split of tensor dimension `dim` across `group` (named `mesh_dim` in the DeviceMesh).
struct ShardLevel {
  int64_t dim = 0;
  std::string mesh_dim;
  ProcessGroupPtr group;
};

/// A rectangle of a tensor: where this rank's block starts and how large it is, per dimension.
struct TensorBox {
  std::vector<int64_t> offsets;
  std::vector<int64_t> sizes;
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : sizes) n *= s;
    return n;
  }
};

/// The global shape of a tensor and how it is sharded, outermost level first.
struct TensorLayout {
  std::vector<int64_t> global_shape;
  std::vector<ShardLevel> levels;

  /// This rank's rectangle of the global tensor.
  TensorBox local_box() const {
    TensorBox box{std::vector<int64_t>(global_shape.size(), 0), global_shape};
    for (const auto& level : levels) {
      TORCH_CHECK(level.dim >= 0 && level.dim < static_cast<int64_t>(global_shape.size()),
                  "titan: shard level on dim ", level.dim, " of a tensor of rank ", global_shape.size());
      TORCH_CHECK(level.group, "titan: shard level over '", level.mesh_dim, "' has no group on this rank");
      auto d = static_cast<size_t>(level.dim);
      auto sizes = chunk_sizes(box.sizes[d], level.group->size());
      int64_t offset = 0;
      for (int r = 0; r < level.group->rank(); ++r) offset += sizes[static_cast<size_t>(r)];
      box.offsets[d] += offset;
      box.sizes[d] = sizes[static_cast<size_t>(level.group->rank())];
    }
    return box;
  }

  /// "Shard(0)@tp,Shard(0)@dp_shard", or "Replicate" with no levels: for metadata and messages.
  std::string placement() const {
    if (levels.empty()) return "Replicate";
    std::string text;
    for (const auto& level : levels)
      text += (text.empty() ? "" : ",") + std::string("Shard(") + std::to_string(level.dim) + ")@" + level.mesh_dim;
    return text;
  }

  /// The same layout with one more (innermost) level.
  TensorLayout with_level(ShardLevel level) const {
    TensorLayout layout = *this;
    layout.levels.push_back(std::move(level));
    return layout;
  }
};

/// A local block with its place in the global tensor: what sharded state dicts hold.
struct ShardedTensor {
  at::Tensor local;         ///< this rank's block, unpadded, shape == box.sizes
  TensorLayout layout;      ///< global shape and shard levels
  TensorBox box;            ///< layout.local_box(), cached
};

/// Named sharded tensors in a stable order (module registration order).
using ShardedStateDict = std::vector<std::pair<std::string, ShardedTensor>>;

/// A replicated (unsharded) tensor as a ShardedTensor.
inline ShardedTensor replicated(const at::Tensor& tensor) {
  TensorLayout layout{tensor.sizes().vec(), {}};
  return ShardedTensor{tensor, layout, layout.local_box()};
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
    const auto hooks = hooks_of(*current);
    for (auto hook = hooks.rbegin(); hook != hooks.rend(); ++hook) {
      if (auto provider = std::dynamic_pointer_cast<ParameterLayoutProvider>(*hook)) {
        if (auto layout = provider->layout_of(rest)) return *layout;
      }
    }
    auto dot = rest.find('.');
    if (dot == std::string::npos) break;
    auto child_name = rest.substr(0, dot);
    const torch::nn::Module* next = nullptr;
    for (const auto& child : current->named_children())
      if (child.key() == child_name) next = child.value().get();
    current = next;
    rest = rest.substr(dot + 1);
  }
  return TensorLayout{parameter.sizes().vec(), {}};
}

/// Every parameter of `module` (local tensors as optimizers see them) with its global layout.
inline ShardedStateDict sharded_parameters(const torch::nn::Module& module) {
  ShardedStateDict result;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    auto layout = parameter_layout(module, item.key(), item.value());
    auto box = layout.local_box();
    TORCH_CHECK(box.sizes == item.value().sizes().vec(),
                "titan: parameter '", item.key(), "' has local shape ", item.value().sizes(),
                " but its layout ", layout.placement(), " gives ", c10::IntArrayRef(box.sizes));
    result.emplace_back(item.key(), ShardedTensor{item.value(), std::move(layout), std::move(box)});
  }
  return result;
}

}  // namespace titan
