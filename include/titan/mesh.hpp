#pragma once
// titan/mesh.hpp: an N-D grid of ranks with named dimensions, one process group per dimension.
//
//   titan::DeviceMesh mesh(world, {"dp_replicate", "dp_shard", "tp"}, {2, 2, 2});
//   mesh.group("tp");          // the 2 ranks that differ from this one only in "tp"
//   mesh["tp"].size();         // a 1-D view sharing that group
//   mesh.flatten({"dp_replicate", "dp_shard"}, "dp");   // one group over both data-parallel dims
//
// Ranks are laid out row-major, as in PyTorch: the last dimension varies fastest.

#include <titan/world.hpp>

#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

namespace titan {

/// A grid of ranks with named dimensions. Copies and views ([] and slice) share process groups.
class DeviceMesh {
 public:
  /// Creates the groups of every dimension. Every rank calls this with the same names and sizes.
  /// The product of `sizes` must equal the world size; a size of -1 (at most one) is inferred.
  DeviceMesh(WorldPtr world, std::vector<std::string> names, std::vector<int64_t> sizes)
      : state_(std::make_shared<State>()) {
    TORCH_CHECK(world, "titan: DeviceMesh needs a World (from titan::init_distributed)");
    TORCH_CHECK(!names.empty(), "titan: DeviceMesh needs at least one dimension");
    TORCH_CHECK(names.size() == sizes.size(), "titan: DeviceMesh got ", names.size(), " names but ",
                sizes.size(), " sizes");
    int64_t known = 1;
    int inferred = -1;
    for (size_t i = 0; i < sizes.size(); ++i) {
      TORCH_CHECK(!names[i].empty(), "titan: DeviceMesh dimension ", i, " has an empty name");
      for (size_t j = 0; j < i; ++j)
        TORCH_CHECK(names[j] != names[i], "titan: DeviceMesh dimension name '", names[i], "' is repeated");
      if (sizes[i] == -1) {
        TORCH_CHECK(inferred < 0, "titan: DeviceMesh can infer only one dimension (-1), got several");
        inferred = static_cast<int>(i);
        continue;
      }
      TORCH_CHECK(sizes[i] >= 1, "titan: DeviceMesh dimension '", names[i], "' has size ", sizes[i],
                  "; sizes must be >= 1 (or -1 to infer one)");
      known *= sizes[i];
    }
    const int64_t world_size = world->world_size();
    if (inferred >= 0) {
      TORCH_CHECK(world_size % known == 0, "titan: DeviceMesh cannot infer '", names[inferred],
                  "': world size ", world_size, " is not divisible by ", known);
      sizes[inferred] = world_size / known;
      known = world_size;
    }
    TORCH_CHECK(known == world_size, "titan: DeviceMesh ", describe(names, sizes), " has ", known,
                " ranks but the world has ", world_size);
    state_->world = std::move(world);
    state_->names = names;
    state_->sizes = sizes;
    const int rank = state_->world->rank();
    for (size_t d = 0; d < sizes.size(); ++d) {
      auto stride = stride_of(d);
      state_->coordinates.push_back(static_cast<int>((rank / stride) % sizes[d]));
    }
    for (size_t d = 0; d < names.size(); ++d) make_group({names[d]}, names[d]);
    dims_ = std::move(names);
  }

  int ndim() const { return static_cast<int>(dims_.size()); }            ///< dimensions of this view
  const std::vector<std::string>& dim_names() const { return dims_; }    ///< names of this view's dims
  const WorldPtr& world() const { return state_->world; }

  /// Ranks along `dim` (a dimension or a flattened name).
  int64_t size(const std::string& dim) const { return group(dim)->size(); }
  /// Ranks in this view.
  int64_t size() const {
    int64_t total = 1;
    for (const auto& dim : dims_) total *= size(dim);
    return total;
  }
  /// This rank's coordinate along `dim`.
  int coordinate(const std::string& dim) const { return group(dim)->rank(); }
  /// The process group along `dim`: this rank and those differing from it only in `dim`.
  const ProcessGroupPtr& group(const std::string& dim) const {
    auto it = state_->groups.find(dim);
    TORCH_CHECK(it != state_->groups.end(), "titan: DeviceMesh has no dimension '", dim, "' (it has ",
                known_names(), ")");
    return it->second;
  }
  /// The 1-D view of dimension `dim`.
  DeviceMesh operator[](const std::string& dim) const { return slice({dim}); }
  /// The view of several dimensions, in the order given.
  DeviceMesh slice(const std::vector<std::string>& dims) const {
    for (const auto& dim : dims) group(dim);  // checks the name
    DeviceMesh view(*this);
    view.dims_ = dims;
    return view;
  }
  /// Adds dimension `name` whose group spans all of `dims` together (e.g. "dp" over
  /// "dp_replicate" and "dp_shard"). Every rank calls it in the same order. Returns the 1-D view.
  DeviceMesh flatten(const std::vector<std::string>& dims, const std::string& name) {
    TORCH_CHECK(!dims.empty(), "titan: DeviceMesh::flatten needs at least one dimension");
    TORCH_CHECK(state_->groups.count(name) == 0, "titan: DeviceMesh already has a dimension '", name, "'");
    for (const auto& dim : dims) base_index(dim);
    make_group(dims, name);
    return (*this)[name];
  }
  /// Whether `dim` names a dimension (or a flattened one) of the mesh.
  bool has_dim(const std::string& dim) const { return state_->groups.count(dim) > 0; }

 private:
  struct State {
    WorldPtr world;
    std::vector<std::string> names;
    std::vector<int64_t> sizes;
    std::vector<int> coordinates;
    std::map<std::string, ProcessGroupPtr> groups;
  };

  static std::string describe(const std::vector<std::string>& names, const std::vector<int64_t>& sizes) {
    std::string text = "(";
    for (size_t i = 0; i < names.size(); ++i) text += (i ? ", " : "") + names[i] + "=" + std::to_string(sizes[i]);
    return text + ")";
  }
  std::string known_names() const {
    std::string text;
    for (const auto& [name, group] : state_->groups) text += (text.empty() ? "" : ", ") + name;
    return text;
  }
  size_t base_index(const std::string& dim) const {
    for (size_t d = 0; d < state_->names.size(); ++d)
      if (state_->names[d] == dim) return d;
    TORCH_CHECK(false, "titan: DeviceMesh has no base dimension '", dim, "'");
  }
  int64_t stride_of(size_t d) const {
    int64_t stride = 1;
    for (size_t e = d + 1; e < state_->sizes.size(); ++e) stride *= state_->sizes[e];
    return stride;
  }

  /// Creates, on every rank, each group that varies `dims` and fixes the others, in one global
  /// order; keeps the one holding this rank.
  void make_group(const std::vector<std::string>& dims, const std::string& name) {
    const auto& sizes = state_->sizes;
    std::vector<bool> varies(sizes.size(), false);
    for (const auto& dim : dims) varies[base_index(dim)] = true;
    const int64_t world_size = state_->world->world_size();
    ProcessGroupPtr mine;
    std::vector<bool> done(static_cast<size_t>(world_size), false);
    for (int64_t first = 0; first < world_size; ++first) {
      if (done[static_cast<size_t>(first)]) continue;
      std::vector<int> members;
      for (int64_t r = 0; r < world_size; ++r) {
        bool same = true;
        for (size_t d = 0; d < sizes.size() && same; ++d)
          if (!varies[d]) same = ((r / stride_of(d)) % sizes[d]) == ((first / stride_of(d)) % sizes[d]);
        if (same) {
          members.push_back(static_cast<int>(r));
          done[static_cast<size_t>(r)] = true;
        }
      }
      auto group = state_->world->new_group(members, "mesh." + name);
      if (group) mine = group;
    }
    state_->groups[name] = mine;
  }

  std::shared_ptr<State> state_;
  std::vector<std::string> dims_;
};

}  // namespace titan
