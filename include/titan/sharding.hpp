#pragma once
// titan/sharding.hpp: how a local tensor relates to the global one (titan's stand-in for DTensor).
//
// A TensorLayout is the global shape plus the shard levels applied to it, outermost first. Each
// level splits one tensor dimension across one process group the way torch.chunk does
// (titan::chunk_sizes: uneven sizes allowed). Every rank's block is then a rectangle of the global
// tensor (offsets + sizes), which is what checkpoints record and reshard by. Example: a 2-D
// FSDP x TP column-parallel weight [out, in] is {Shard(0) over "tp", Shard(0) over "dp_shard"}.

#include <titan/collectives.hpp>
#include <titan/world.hpp>

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

}  // namespace titan
