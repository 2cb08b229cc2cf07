#pragma once
// titan/tensor_parallel.hpp: Megatron-style tensor parallelism for an unchanged LibTorch model.
//
//   titan::ParallelizePlan plan;
//   plan.add("tok_embeddings", titan::RowwiseParallel().input_layout(titan::Replicate()).output_layout(titan::Shard(1)))
//       .add("layers.*.attention_norm", titan::SequenceParallel())
//       .add("layers.*.attention", titan::PrepareModuleInput().input_layouts({titan::Shard(1), std::nullopt})
//                                                             .desired_input_layouts({titan::Replicate(), std::nullopt}))
//       .add("layers.*.attention.wq", titan::ColwiseParallel())
//       .add("layers.*.attention.wo", titan::RowwiseParallel().output_layout(titan::Shard(1)));
//   titan::parallelize_module(*model, mesh["tp"], plan);   // parameters become local shards, in place
//   auto logits = titan::call(model, tokens);               // hooks move activations between layouts
//   auto loss = titan::loss_parallel_cross_entropy(logits, labels, mesh.group("tp"));
//
// There is no DTensor: an activation is a plain local tensor and its layout over the TP group is
// a convention between consecutive styles of the plan (a Placement):
//   Replicate()  every rank holds the whole tensor, and its gradient is whole (and equal) on every rank;
//   Shard(d)     rank r holds chunk r of dimension d (torch.chunk sizes) and the matching chunk of its gradient.
// Each style states the layouts it accepts and produces. Parameters are replaced by their local
// shard in place (Tensor::set_data, also on the meta device, where nothing is allocated), so the
// module's members, its parameter dictionary and optimizers all see the shard; each style's hook
// reports the parameters' TensorLayouts (sharding.hpp), which FSDP composes with for 2-D.

#include <titan/collectives.hpp>
#include <titan/hooks.hpp>
#include <titan/mesh.hpp>
#include <titan/sharding.hpp>

#include <ATen/core/Reduction.h>
#include <c10/util/accumulate.h>
#include <torch/arg.h>
#include <torch/nn/modules/embedding.h>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace titan {

/// The layout of an activation over the tensor-parallel group: replicated, or sharded on one dim.
class Placement {
 public:
  /// Every rank holds the whole tensor (and the whole gradient).
  static Placement replicate() { return Placement(Kind::Replicate, 0); }
  /// Rank r holds chunk r of dimension `dim` (negative counts from the end).
  static Placement shard(int64_t dim) { return Placement(Kind::Shard, dim); }
  /// Every rank holds the whole tensor, but each rank's gradient is a partial sum that the
  /// producer of the tensor reduces (DTensor's Replicate value with a Partial gradient). Lets the
  /// column-parallel layers sharing one input (q, k, v; w1, w3) add their gradients locally, so
  /// the input's gradient is reduced once: one reduce-scatter under sequence parallelism, one
  /// all-reduce without. Only a desired layout of PrepareModuleInput (the producer) and the input
  /// layout of ColwiseParallel (a consumer) take it.
  static Placement replicate_partial_grad() { return Placement(Kind::ReplicatePartialGrad, 0); }

  bool is_replicate() const { return kind_ == Kind::Replicate; }  ///< whether this is Replicate()
  bool is_shard() const { return kind_ == Kind::Shard; }          ///< whether this is Shard(d)
  /// Whether this is ReplicatePartialGrad().
  bool is_replicate_partial_grad() const { return kind_ == Kind::ReplicatePartialGrad; }
  /// The sharded dimension as given (may be negative); only for Shard(d).
  int64_t dim() const {
    TORCH_CHECK(is_shard(), "titan: ", str(), " has no shard dimension");
    return dim_;
  }
  /// The sharded dimension of a tensor of rank `ndim` (negative dims wrapped).
  int64_t dim_for(int64_t ndim) const {
    int64_t d = dim();
    TORCH_CHECK(d >= -ndim && d < ndim, "titan: ", str(), " does not fit a tensor of rank ", ndim);
    return d < 0 ? d + ndim : d;
  }
  /// "Replicate()", "Shard(d)" or "ReplicatePartialGrad()".
  std::string str() const {
    if (is_shard()) return "Shard(" + std::to_string(dim_) + ")";
    return is_replicate() ? "Replicate()" : "ReplicatePartialGrad()";
  }
  bool operator==(const Placement& other) const {
    return kind_ == other.kind_ && (!is_shard() || dim_ == other.dim_);
  }
  bool operator!=(const Placement& other) const { return !(*this == other); }

 private:
  enum class Kind { Replicate, Shard, ReplicatePartialGrad };
  Placement(Kind kind, int64_t dim) : kind_(kind), dim_(dim) {}
  Kind kind_;
  int64_t dim_;
};

/// Placement::replicate(), named as in PyTorch plans.
inline Placement Replicate() { return Placement::replicate(); }
/// Placement::shard(dim), named as in PyTorch plans.
inline Placement Shard(int64_t dim) { return Placement::shard(dim); }
/// Placement::replicate_partial_grad().
inline Placement ReplicatePartialGrad() { return Placement::replicate_partial_grad(); }

namespace detail {

/// The global extents of the sharded activations the hooks of one plan produced, by (tensor
/// rank, dim). A hook that makes a Shard(d) activation whole again (or moves it to another dim)
/// takes every rank's size from chunk_sizes(extent) instead of an all-gather of the sizes and a
/// host read, which would stall a GPU's queue at every layer. Each entry carries the outermost
/// titan::call (pass) of the forward that recorded it: a forward reads only its own entries; a
/// recomputation during backward (activation checkpointing) reads the last forward's. Every rank
/// runs the same hooks, so every rank makes the same choice; with no entry (an activation
/// sharded by the caller), or two different extents in one forward, the sizes are exchanged.
class ActivationExtents {
 public:
  void record(int64_t ndim, int64_t dim, int64_t extent) {
    const uint64_t pass = call_tracking().pass;
    auto [it, fresh] = entries_.try_emplace({ndim, dim}, Entry{pass, extent});
    if (fresh) return;
    if (it->second.pass != pass) {
      it->second = Entry{pass, extent};
    } else if (it->second.extent != extent) {
      it->second.extent = -1;  // ambiguous in this forward
    }
  }
  std::optional<int64_t> find(int64_t ndim, int64_t dim) const {
    auto it = entries_.find({ndim, dim});
    if (it == entries_.end() || it->second.extent < 0) return std::nullopt;
    if (!in_backward() && it->second.pass != call_tracking().pass) return std::nullopt;
    return it->second.extent;
  }

 private:
  struct Entry {
    uint64_t pass;
    int64_t extent;  ///< -1: two different extents in one forward
  };
  std::map<std::pair<int64_t, int64_t>, Entry> entries_;
};

/// Every rank's size along `dim` of the Shard(dim) activation `x`: chunk_sizes of the extent the
/// plan recorded, checked against this rank's, else exchanged.
inline std::vector<int64_t> shard_sizes(const at::Tensor& x, const ProcessGroup& group, int64_t dim,
                                        const ActivationExtents* extents, const std::string& where) {
  if (extents) {
    if (auto extent = extents->find(x.dim(), dim)) {
      auto sizes = chunk_sizes(*extent, group.size());
      TORCH_CHECK(sizes[static_cast<size_t>(group.rank())] == x.size(dim), "titan: ", where, ": this rank's Shard(",
                  dim, ") activation has ", x.size(dim), " rows on dim ", dim, ", but this forward's tensor-parallel ",
                  "hooks split an extent of ", *extent, " there into ", c10::IntArrayRef(sizes),
                  "; an activation sharded outside the plan must come in torch.chunk sizes of its extent");
      return sizes;
    }
  }
  return exchange_sizes(x, group, dim);
}

/// redistribute, recording the extents it produces in `extents` and reading the ones it needs
/// from there (nullptr: sizes exchanged).
inline at::Tensor redistribute_tracked(const at::Tensor& x, const Placement& from, const Placement& to,
                                       const ProcessGroupPtr& group, ActivationExtents* extents,
                                       const std::string& where) {
  TORCH_CHECK(!from.is_replicate_partial_grad(), "titan: ReplicatePartialGrad() is a layout a module receives, ",
              "not one a tensor arrives in (redistributing it to ", to.str(), ")");
  if (group->size() == 1) return x;
  auto sizes_of = [&](int64_t dim) { return shard_sizes(x, *group, dim, extents, where); };
  if (to.is_replicate_partial_grad()) {
    if (from.is_replicate()) return copy_to_group(x, group);
    const int64_t dim = from.dim_for(x.dim());
    return all_gather(x, group, dim, sizes_of(dim));
  }
  if (from.is_replicate() && to.is_replicate()) return x;
  if (from.is_shard() && to.is_replicate()) {
    const int64_t dim = from.dim_for(x.dim());
    return gather_from_group(x, group, dim, sizes_of(dim));
  }
  if (from.is_replicate() && to.is_shard()) {
    const int64_t dim = to.dim_for(x.dim());
    if (extents) extents->record(x.dim(), dim, x.size(dim));
    return scatter_to_group(x, group, dim);
  }
  const int64_t from_dim = from.dim_for(x.dim()), to_dim = to.dim_for(x.dim());
  if (from_dim == to_dim) return x;
  auto from_sizes = sizes_of(from_dim);
  if (extents) extents->record(x.dim(), to_dim, x.size(to_dim));
  return all_to_all(x, group, from_dim, to_dim, std::move(from_sizes));
}

}  // namespace detail

/// Moves an activation from layout `from` to layout `to` over the TP group, differentiably
/// (collectives.hpp): Replicate -> Shard(d) scatter_to_group, Shard(d) -> Replicate
/// gather_from_group, Shard(a) -> Shard(b) all_to_all, equal layouts an identity. To
/// ReplicatePartialGrad(): from Shard(d) an all-gather whose backward reduce-scatters the summed
/// partial gradients, from Replicate() copy_to_group (backward all-reduce). The sizes of a
/// Shard(d) input are exchanged (one small collective); the hooks of a plan know them instead.
inline at::Tensor redistribute(const at::Tensor& x, const Placement& from, const Placement& to,
                               const ProcessGroupPtr& group) {
  return detail::redistribute_tracked(x, from, to, group, nullptr, "redistribute");
}

/// A way of parallelizing one module over a TP group (ColwiseParallel, RowwiseParallel,
/// SequenceParallel, PrepareModuleInput, PrepareModuleOutput). A style is a value with chained setters; applying it
/// shards the module's parameters in place and attaches a bound copy of it as the module's hook,
/// which titan::call runs and which reports the sharded parameters' layouts.
class ParallelStyle : public ModuleHook, public ParameterLayoutProvider {
 public:
  /// Shards `module`'s parameters over `group` (named `mesh_dim`) and attaches the hook. `path` is
  /// the module's name in the model, for messages.
  virtual void apply(torch::nn::Module& module, const std::string& path, const ProcessGroupPtr& group,
                     const std::string& mesh_dim) const = 0;

  HookKind kind() const override { return HookKind::TensorParallel; }

  /// The extents record the hooks of one plan share (parallelize_module hands every hook it
  /// attaches the same one); without it, shard sizes are exchanged.
  void share_extents(std::shared_ptr<detail::ActivationExtents> extents) { extents_ = std::move(extents); }

  std::optional<TensorLayout> layout_of(const std::string& relative_name) const override {
    auto it = layouts_.find(relative_name);
    if (it == layouts_.end()) return std::nullopt;
    return it->second;
  }

  /// The tp group, for the parameters whose gradients this hook sums (sum_gradients_of).
  std::vector<int> gradient_reduction_ranks(const at::Tensor& param) const override {
    if (summed_ == nullptr || group_->size() == 1 || !param.requires_grad()) return {};
    for (const auto& parameter : summed_->parameters(/*recurse=*/true))
      if (parameter.is_same(param)) return group_->global_ranks();
    return {};
  }

 protected:
  /// Sums the gradients of `module`'s trainable parameters (its submodules' too) over the bound
  /// group, where each rank's is a partial sum (a module that is not split but sees only this
  /// rank's part of the work); `module` outlives the hook (it owns it or an ancestor of it).
  void sum_gradients_of(torch::nn::Module& module) {
    summed_ = &module;
    if (group_->size() == 1) return;
    for (auto& parameter : module.parameters(/*recurse=*/true)) {
      if (!parameter.requires_grad()) continue;
      parameter.register_hook(
          [group = group_](const at::Tensor& grad) { return detail::all_reduce_raw(grad, *group, ReduceOp::Sum); });
    }
  }

  /// Binds this (copied) style to the group after checking `module` is not parallelized yet.
  void bind(const torch::nn::Module& module, const std::string& path, const ProcessGroupPtr& group,
            const std::string& mesh_dim) {
    TORCH_CHECK(group, "titan: ", name(), " on '", path, "': this rank is not in the tensor-parallel group");
    for (const auto& hook : hooks_of(module)) {
      TORCH_CHECK(!std::dynamic_pointer_cast<ParameterLayoutProvider>(hook), "titan: ", name(), " on '", path,
                  "': the module already has the hook '", hook->name(),
                  "' (apply tensor parallelism once, and before fully_shard)");
    }
    group_ = group;
    mesh_dim_ = mesh_dim;
    path_ = path;
  }

  /// Replaces parameter `name` of `module` by this rank's chunk of dimension `dim`, in place, and
  /// records its layout. With `parts` (sizes along `dim` summing to it), each part is split and
  /// the rank keeps its chunk of every part, concatenated (a fused projection). Works on meta
  /// parameters without allocating.
  void shard_parameter(torch::nn::Module& module, const std::string& name, int64_t dim,
                       const std::vector<int64_t>& parts = {}) {
    auto parameter = direct_parameter(module, name);
    TORCH_CHECK(dim < parameter.dim(), "titan: ", this->name(), " on '", path_, "': parameter '", name, "' of shape ",
                parameter.sizes(), " has no dimension ", dim);
    const auto global = parameter.sizes().vec();
    const int n = group_->size();
    for (auto part : parts.empty() ? std::vector<int64_t>{global[static_cast<size_t>(dim)]} : parts)
      TORCH_CHECK(chunk_sizes(part, n).back() > 0, "titan: ", this->name(), " on '", path_, "': dimension ", dim,
                  " of '", name, "' (", parts.empty() ? "size " : "a fused part of size ", part,
                  ") cannot give each of the ", n, " tensor-parallel ranks a non-empty chunk");
    TensorLayout layout{global, {ShardLevel{dim, mesh_dim_, group_, parts}}};
    const auto blocks = layout.local_blocks();  // checks that the parts add up to the dimension
    if (n > 1) {
      at::Tensor local;
      {
        at::NoGradGuard no_grad;
        std::vector<at::Tensor> pieces;  // meta stays meta: no allocation
        for (const auto& block : blocks) pieces.push_back(block.view_of_global(parameter));
        local = at::cat(pieces, dim).contiguous();
      }
      parameter.set_data(local);  // the same TensorImpl: member and dictionary both see the shard
      parameter.mutable_grad() = at::Tensor();
    }
    layouts_[name] = std::move(layout);
  }

  /// `module`'s own parameter `name` (a handle to the same TensorImpl), with a clear error if absent.
  at::Tensor direct_parameter(const torch::nn::Module& module, const std::string& name) const {
    auto parameters = module.named_parameters(/*recurse=*/false);
    auto* found = parameters.find(name);
    TORCH_CHECK(found != nullptr, "titan: ", this->name(), " on '", path_, "' needs a parameter named '", name,
                "' (the module has ", names_of(module), ")");
    return *found;
  }

  /// Checks that `module` holds only the parameters `allowed` (directly, no submodule parameters).
  void check_parameters(const torch::nn::Module& module, const std::vector<std::string>& allowed) const {
    for (const auto& item : module.named_parameters(/*recurse=*/true)) {
      bool known = std::find(allowed.begin(), allowed.end(), item.key()) != allowed.end();
      TORCH_CHECK(known, "titan: ", name(), " on '", path_, "' does not know how to shard parameter '", item.key(),
                  "' (it shards a module whose parameters are 'weight' [out, in] and optionally 'bias' [out])");
    }
  }

  static std::string names_of(const torch::nn::Module& module) {
    std::string text;
    for (const auto& item : module.named_parameters(/*recurse=*/false)) text += (text.empty() ? "" : ", ") + item.key();
    return text.empty() ? std::string("no parameters") : "parameters " + text;
  }

  ProcessGroupPtr group_;                    ///< the TP group (set on the attached copy)
  const torch::nn::Module* summed_ = nullptr;  ///< whose parameters' gradients are summed (sum_gradients_of)
  std::string mesh_dim_;                     ///< its mesh dimension name, for layouts
  std::string path_;                         ///< the module's name in the model, for messages
  std::map<std::string, TensorLayout> layouts_;  ///< layouts of the sharded parameters
  std::shared_ptr<detail::ActivationExtents> extents_;  ///< shared by the plan's hooks, or null
};

namespace detail {

/// Gives a parameter the values of `zeros` (of its shape, dtype and device) for its lifetime, in
/// place (every handle, the module's member included, sees them), and its own values back
/// afterwards. Autograd still records the parameter itself, so its gradient is unchanged (for a
/// bias, which backward does not read).
class ZeroedDuringForward {
 public:
  ZeroedDuringForward(at::Tensor parameter, const at::Tensor& zeros)
      : parameter_(std::move(parameter)), values_(parameter_.tensor_data()) {
    parameter_.set_data(zeros);
  }
  ~ZeroedDuringForward() { parameter_.set_data(values_); }
  ZeroedDuringForward(const ZeroedDuringForward&) = delete;
  ZeroedDuringForward& operator=(const ZeroedDuringForward&) = delete;

 private:
  at::Tensor parameter_;
  at::Tensor values_;  ///< shares the parameter's storage
};

inline bool is_embedding(const torch::nn::Module& module, bool declared) {
  return declared || dynamic_cast<const torch::nn::EmbeddingImpl*>(&module) != nullptr;
}

inline void check_feature_layout(const Placement& layout, const char* style, const char* what, bool allow_last) {
  if (layout.is_shard() && !allow_last)
    TORCH_CHECK(layout.dim() != -1, "titan: ", style, " ", what, " cannot be Shard(-1): the last dimension holds "
                "the features it splits; use Replicate() or a sequence dimension such as Shard(1)");
}

}  // namespace detail

/// Column parallel: splits the OUTPUT features. On a linear-like module (parameters 'weight'
/// [out, in], optional 'bias' [out]) weight and bias are sharded on dim 0; on an embedding
/// (torch::nn::Embedding, or any module declared with embedding(true)) the weight [vocab, dim] is
/// sharded on dim 1.
///   input  (first tensor argument): Replicate() (default: forward identity, backward all-reduce),
///          Shard(d) of a sequence dim d (all-gathered along d; backward reduce-scatter), or
///          ReplicatePartialGrad() (identity both ways: the producer, a PrepareModuleInput,
///          reduces the gradient once for every layer sharing the input);
///   output: Shard(-1) (default: the local features) or Replicate() (all-gathered features).
/// A fused projection computing several outputs at once ([q|k|v] of GPT-2's c_attn, [gate|up] of
/// a fused SwiGLU) needs fused_sizes: splitting it as one block would give rank 0 q and part of k.
/// With fused_sizes each part is split across the ranks (as Megatron splits fused qkv), so rank r
/// computes chunk r of every part, and its local output is [q_r|k_r|v_r].
class ColwiseParallel : public ParallelStyle {
 public:
  /// Layout of the first tensor input.
  TORCH_ARG(Placement, input_layout) = Replicate();
  /// Layout of the output: Shard(-1) (local) or Replicate() (gathered).
  TORCH_ARG(Placement, output_layout) = Shard(-1);
  /// The module is an embedding table (weight [vocab, dim], integer ids in); automatic for torch::nn::Embedding.
  TORCH_ARG(bool, embedding) = false;
  /// The output features are these parts laid end to end (e.g. {dim, dim, dim} for a fused
  /// [q|k|v]; sizes summing to the features), each split across the ranks. Empty: one part.
  TORCH_ARG(std::vector<int64_t>, fused_sizes) = {};

 public:
  std::string name() const override { return "tensor-parallel colwise"; }

  void apply(torch::nn::Module& module, const std::string& path, const ProcessGroupPtr& group,
             const std::string& mesh_dim) const override {
    TORCH_CHECK(output_layout_ == Shard(-1) || output_layout_.is_replicate(), "titan: ColwiseParallel on '", path,
                "': output_layout must be Shard(-1) or Replicate(), got ", output_layout_.str());
    detail::check_feature_layout(input_layout_, "ColwiseParallel", "input_layout", false);
    auto hook = std::make_shared<ColwiseParallel>(*this);
    hook->bind(module, path, group, mesh_dim);
    hook->check_parameters(module, {"weight", "bias"});
    const bool embedding = detail::is_embedding(module, embedding_);
    const auto weight = hook->direct_parameter(module, "weight");
    TORCH_CHECK(weight.dim() == 2, "titan: ColwiseParallel on '", path, "' needs a 2-D weight, got ", weight.sizes());
    const int64_t features = weight.size(embedding ? 1 : 0);
    int64_t fused = 0;
    for (auto part : fused_sizes_) fused += part;
    TORCH_CHECK(fused_sizes_.empty() || fused == features, "titan: ColwiseParallel on '", path, "': fused_sizes ",
                c10::IntArrayRef(fused_sizes_), " sum to ", fused, " but the module has ", features, " output features");
    hook->shard_parameter(module, "weight", embedding ? 1 : 0, fused_sizes_);
    if (module.named_parameters(false).contains("bias")) hook->shard_parameter(module, "bias", 0, fused_sizes_);
    // Every rank's local features, and for a fused module the order that turns the gathered
    // [q_0|k_0|v_0|q_1|k_1|v_1|...] back into [q|k|v].
    const auto parts = fused_sizes_.empty() ? std::vector<int64_t>{features} : fused_sizes_;
    const int n = group->size();
    std::vector<FusedExtents> of_rank;
    hook->output_sizes_.clear();
    for (int r = 0; r < n; ++r) {
      of_rank.push_back(fused_extents(parts, n, r));
      hook->output_sizes_.push_back(of_rank.back().local_size);
    }
    if (!fused_sizes_.empty()) {
      for (size_t i = 0; i < parts.size(); ++i) {
        for (int r = 0; r < n; ++r) {
          const auto& extent = of_rank[static_cast<size_t>(r)].parts[i];
          const int64_t start = chunk_offset(hook->output_sizes_, r) + extent.local_offset;
          for (int64_t k = 0; k < extent.size; ++k) hook->gather_order_.push_back(start + k);
        }
      }
    }
    attach_hook(module, hook);
  }

  /// Colwise projections with a local output fuse (titan::call_fused) when they take their input
  /// alike from the same group: the input is prepared once, for all of them.
  bool fuses_with(const ModuleHook& other) const override {
    const auto* colwise = dynamic_cast<const ColwiseParallel*>(&other);
    return colwise && colwise->group_ == group_ && colwise->input_layout_ == input_layout_ &&
           output_layout_ == Shard(-1) && colwise->output_layout_ == Shard(-1) && !embedding_ && !colwise->embedding_;
  }

  at::Tensor forward(torch::nn::Module&, const TensorList& inputs, const ForwardFn& next) override {
    TORCH_CHECK(!inputs.empty(), "titan: ColwiseParallel on '", path_, "' needs a tensor input");
    TensorList prepared = inputs;
    auto& x = prepared[0];
    if (input_layout_.is_replicate()) {
      x = copy_to_group(x, group_);
    } else if (input_layout_.is_shard()) {
      const int64_t dim = input_layout_.dim_for(x.dim());
      x = all_gather(x, group_, dim, detail::shard_sizes(x, *group_, dim, extents_.get(), path_));
    }  // ReplicatePartialGrad(): as it is; its producer reduces the gradient
    auto out = next(prepared);  // [..., out / tp]
    if (output_layout_.is_replicate()) {
      out = gather_from_group(out, group_, -1, output_sizes_);  // [..., out], rank by rank
      if (!gather_order_.empty()) {
        if (!gather_index_.defined() || gather_index_.device() != out.device())  // made once per device
          gather_index_ = at::tensor(gather_order_, at::TensorOptions().dtype(at::kLong)).to(out.device());
        out = out.index_select(-1, gather_index_);
      }
    }
    return out;
  }

 private:
  at::Tensor gather_index_;            ///< gather_order_ on the output's device
  std::vector<int64_t> output_sizes_;  ///< every rank's number of output features
  std::vector<int64_t> gather_order_;  ///< fused: gathered feature index of each global feature
};

/// Row parallel: splits the INPUT features. On a linear-like module the weight [out, in] is sharded
/// on dim 1 and the bias stays replicated (added once); on an embedding (vocabulary parallel;
/// torch::nn::Embedding, or any module declared with embedding(true)) the weight [vocab, dim] is sharded on dim 0, token ids outside this rank's vocabulary
/// range are looked up as 0 and their rows zeroed, and the partial rows are summed.
///   input  (first tensor argument): Shard(-1) (default; the local features of a ColwiseParallel
///          output) or Replicate() (this rank takes its chunk); an embedding requires Replicate();
///   output: Replicate() (default: all-reduce; backward identity) or Shard(d) (reduce-scatter into
///          chunks of dim d, e.g. Shard(1) for sequence parallel; backward all-gather).
class RowwiseParallel : public ParallelStyle {
 public:
  /// Layout of the first tensor input.
  TORCH_ARG(Placement, input_layout) = Shard(-1);
  /// Layout of the output.
  TORCH_ARG(Placement, output_layout) = Replicate();
  /// The module is an embedding table (weight [vocab, dim], integer ids in); automatic for torch::nn::Embedding.
  TORCH_ARG(bool, embedding) = false;

 public:
  std::string name() const override { return "tensor-parallel rowwise"; }

  void apply(torch::nn::Module& module, const std::string& path, const ProcessGroupPtr& group,
             const std::string& mesh_dim) const override {
    detail::check_feature_layout(output_layout_, "RowwiseParallel", "output_layout", false);
    TORCH_CHECK(!output_layout_.is_replicate_partial_grad(), "titan: RowwiseParallel on '", path,
                "': output_layout must be Replicate() or Shard(d), got ", output_layout_.str());
    auto hook = std::make_shared<RowwiseParallel>(*this);
    hook->bind(module, path, group, mesh_dim);
    hook->check_parameters(module, {"weight", "bias"});
    const auto weight = hook->direct_parameter(module, "weight");
    TORCH_CHECK(weight.dim() == 2, "titan: RowwiseParallel on '", path, "' needs a 2-D weight, got ", weight.sizes());
    if (detail::is_embedding(module, embedding_)) {
      TORCH_CHECK(input_layout_.is_replicate(), "titan: RowwiseParallel on embedding '", path,
                  "' needs input_layout Replicate() (token ids), got ", input_layout_.str());
      if (auto* library = dynamic_cast<torch::nn::EmbeddingImpl*>(&module))
        TORCH_CHECK(!library->options.padding_idx() && !library->options.max_norm(),
                    "titan: RowwiseParallel on embedding '", path,
                    "': padding_idx and max_norm are not supported with a vocabulary-sharded weight");
      auto sizes = chunk_sizes(weight.size(0), group->size());
      hook->vocab_start_ = chunk_offset(sizes, group->rank());
      hook->vocab_end_ = hook->vocab_start_ + sizes[static_cast<size_t>(group->rank())];
      hook->is_embedding_ = true;
      hook->shard_parameter(module, "weight", 0);
      attach_hook(module, hook);
      return;
    }
    TORCH_CHECK(input_layout_ == Shard(-1) || input_layout_.is_replicate(), "titan: RowwiseParallel on '", path,
                "': input_layout must be Shard(-1) or Replicate(), got ", input_layout_.str());
    hook->shard_parameter(module, "weight", 1);
    if (module.named_parameters(false).contains("bias")) hook->bias_ = hook->direct_parameter(module, "bias");
    attach_hook(module, hook);
  }

  at::Tensor forward(torch::nn::Module&, const TensorList& inputs, const ForwardFn& next) override {
    TORCH_CHECK(!inputs.empty(), "titan: RowwiseParallel on '", path_, "' needs a tensor input");
    TensorList prepared = inputs;
    at::Tensor partial;
    if (is_embedding_) {
      const auto& ids = inputs[0];  // [batch, seq] token ids over the whole vocabulary
      auto outside = (ids < vocab_start_).logical_or(ids >= vocab_end_);
      prepared[0] = (ids - vocab_start_).masked_fill(outside, 0);
      partial = next(prepared).masked_fill(outside.unsqueeze(-1), 0.0);  // [batch, seq, dim], this rank's rows
    } else {
      if (input_layout_.is_replicate()) prepared[0] = scatter_to_group(prepared[0], group_, -1);
      // The reduction must add the bias once: rank 0's forward adds it, the others run with it
      // zeroed. Its gradient still reaches the parameter on every rank (whole, since the
      // reduction's backward hands each rank the whole output gradient).
      std::optional<detail::ZeroedDuringForward> zeroed;
      if (bias_.defined() && group_->rank() != 0) {
        if (!bias_zeros_.defined() || bias_zeros_.sizes() != bias_.sizes() || bias_zeros_.dtype() != bias_.dtype() ||
            bias_zeros_.device() != bias_.device())
          bias_zeros_ = at::zeros_like(bias_, at::MemoryFormat::Contiguous);  // made once (per dtype)
        zeroed.emplace(bias_, bias_zeros_);
      }
      partial = next(prepared);  // [..., out] partial sums, the bias in rank 0's
    }
    if (output_layout_.is_replicate()) return reduce_from_group(partial, group_);
    const int64_t dim = output_layout_.dim_for(partial.dim());
    if (extents_) extents_->record(partial.dim(), dim, partial.size(dim));
    return reduce_scatter(partial, group_, dim, ReduceOp::Sum);
  }

 private:
  bool is_embedding_ = false;                ///< vocabulary parallel (resolved at apply)
  int64_t vocab_start_ = 0, vocab_end_ = 0;  ///< this rank's token id range [start, end)
  at::Tensor bias_;                          ///< the replicated bias of a linear-like module, if any
  at::Tensor bias_zeros_;                    ///< what the bias reads on ranks other than 0
};

/// Sequence parallel for modules that act on each position independently (norms, dropout): the
/// activations stay sharded on the sequence dimension (input and output Shard(1) by default), the
/// parameters stay replicated, and since each rank's gradient covers only its sequence chunk, the
/// parameters' gradients are all-reduced (sum) over the TP group as backward computes them.
class SequenceParallel : public ParallelStyle {
 public:
  /// The sharded sequence dimension of the input and output (documentation and checks).
  TORCH_ARG(int64_t, sequence_dim) = 1;

 public:
  std::string name() const override { return "tensor-parallel sequence_parallel"; }

  void apply(torch::nn::Module& module, const std::string& path, const ProcessGroupPtr& group,
             const std::string& mesh_dim) const override {
    auto hook = std::make_shared<SequenceParallel>(*this);
    hook->bind(module, path, group, mesh_dim);
    hook->sum_gradients_of(module);  // each rank's: its sequence chunk's part
    attach_hook(module, hook);
  }

  at::Tensor forward(torch::nn::Module&, const TensorList& inputs, const ForwardFn& next) override {
    check_inputs(inputs);
    return next(inputs);  // position-wise: the local sequence chunk in, the same chunk out
  }

  /// A position-wise module returning several tensors (a residual add fused with its norm): each
  /// output keeps the inputs' sequence chunk.
  TensorList forward_outputs(torch::nn::Module&, const TensorList& inputs, const OutputsForwardFn& next) override {
    check_inputs(inputs);
    return next(inputs);
  }

 private:

  void check_inputs(const TensorList& inputs) const {
    for (const auto& x : inputs)
      TORCH_CHECK(x.dim() > sequence_dim_, "titan: SequenceParallel on '", path_, "' expects inputs sharded on dim ",
                  sequence_dim_, ", got a tensor of rank ", x.dim());
  }
};

/// Moves a module's tensor inputs from the layouts they arrive in to the layouts its forward
/// needs (e.g. an attention block's input from Shard(1) to Replicate(), or to
/// ReplicatePartialGrad() when its column-parallel layers take that). One entry per tensor
/// argument, in order; std::nullopt leaves that argument alone. Has no parameters to shard.
class PrepareModuleInput : public ParallelStyle {
 public:
  /// Layouts the tensor arguments arrive in.
  TORCH_ARG(std::vector<std::optional<Placement>>, input_layouts);
  /// Layouts forward receives.
  TORCH_ARG(std::vector<std::optional<Placement>>, desired_input_layouts);

 public:
  std::string name() const override { return "tensor-parallel prepare_module_input"; }

  void apply(torch::nn::Module& module, const std::string& path, const ProcessGroupPtr& group,
             const std::string& mesh_dim) const override {
    TORCH_CHECK(input_layouts_.size() == desired_input_layouts_.size(), "titan: PrepareModuleInput on '", path,
                "' has ", input_layouts_.size(), " input_layouts but ", desired_input_layouts_.size(),
                " desired_input_layouts");
    for (size_t i = 0; i < input_layouts_.size(); ++i)
      TORCH_CHECK(input_layouts_[i].has_value() == desired_input_layouts_[i].has_value(),
                  "titan: PrepareModuleInput on '", path, "': input ", i,
                  " has a layout on one side and std::nullopt on the other");
    auto hook = std::make_shared<PrepareModuleInput>(*this);
    hook->bind(module, path, group, mesh_dim);
    attach_hook(module, hook);
  }

  at::Tensor forward(torch::nn::Module&, const TensorList& inputs, const ForwardFn& next) override {
    TORCH_CHECK(inputs.size() == input_layouts_.size(), "titan: PrepareModuleInput on '", path_, "' has ",
                input_layouts_.size(), " layouts but forward got ", inputs.size(), " tensor arguments");
    TensorList prepared = inputs;
    for (size_t i = 0; i < inputs.size(); ++i)
      if (input_layouts_[i])
        prepared[i] = detail::redistribute_tracked(inputs[i], *input_layouts_[i], *desired_input_layouts_[i], group_,
                                                   extents_.get(), path_);
    return next(prepared);
  }
};

/// Moves a module's output from the layout its forward produces to the layout the modules after
/// it expect (e.g. a replicated block output to Shard(1) for sequence parallel norms). The output
/// is the single tensor forward returns. Has no parameters to shard. A module needing both input
/// and output preparation gets the output one on a wrapper module (one TP style per module).
class PrepareModuleOutput : public ParallelStyle {
 public:
  /// Layout forward's output is in.
  TORCH_ARG(Placement, output_layout) = Replicate();
  /// Layout the caller receives.
  TORCH_ARG(Placement, desired_output_layout) = Replicate();

 public:
  std::string name() const override { return "tensor-parallel prepare_module_output"; }

  void apply(torch::nn::Module& module, const std::string& path, const ProcessGroupPtr& group,
             const std::string& mesh_dim) const override {
    for (const auto* layout : {&output_layout_, &desired_output_layout_})
      TORCH_CHECK(!layout->is_replicate_partial_grad(), "titan: PrepareModuleOutput on '", path,
                  "': output layouts must be Replicate() or Shard(d), got ", layout->str());
    auto hook = std::make_shared<PrepareModuleOutput>(*this);
    hook->bind(module, path, group, mesh_dim);
    attach_hook(module, hook);
  }

  at::Tensor forward(torch::nn::Module&, const TensorList& inputs, const ForwardFn& next) override {
    return detail::redistribute_tracked(next(inputs), output_layout_, desired_output_layout_, group_, extents_.get(),
                                        path_);
  }
};

/// Which module gets which style: (pattern, style) entries applied in order. A pattern is a dotted
/// module name in which a '*' matches any run of characters inside one name component, e.g.
/// "layers.*.attention.wq"; "" is the root module. Every entry must match at least one module.
class ParallelizePlan {
 public:
  /// Adds an entry (the style is copied).
  template <typename Style>
  ParallelizePlan& add(std::string pattern, Style style) {
    static_assert(std::is_base_of_v<ParallelStyle, Style>, "titan::ParallelizePlan::add needs a ParallelStyle");
    entries_.emplace_back(std::move(pattern), std::make_shared<Style>(std::move(style)));
    return *this;
  }
  /// Adds an entry sharing `style` (e.g. an entry of another plan).
  ParallelizePlan& add(std::string pattern, std::shared_ptr<const ParallelStyle> style) {
    entries_.emplace_back(std::move(pattern), std::move(style));
    return *this;
  }
  /// The entries, in order.
  const std::vector<std::pair<std::string, std::shared_ptr<const ParallelStyle>>>& entries() const { return entries_; }

 private:
  std::vector<std::pair<std::string, std::shared_ptr<const ParallelStyle>>> entries_;
};

/// Applies `plan` to the submodules of `module` (a module, ModuleHolder, shared_ptr or pointer)
/// over `tp_group` (whose mesh dimension is `mesh_dim`): shards their parameters in place (meta
/// parameters stay meta) and attaches the styles' hooks. Call it on every rank of the group,
/// before checkpoint_wrapper and fully_shard, with the model calling those submodules through
/// titan::call.
template <typename M>
void parallelize_module(M&& module_like, const ProcessGroupPtr& tp_group, const ParallelizePlan& plan,
                        const std::string& mesh_dim = "tp") {
  torch::nn::Module& module = detail::module_ref(module_like);
  TORCH_CHECK(tp_group, "titan::parallelize_module: this rank is not in the tensor-parallel group");
  detail::check_hook_order(module, HookKind::TensorParallel, "titan::parallelize_module");
  std::map<std::string, std::string> claimed;  // module name -> the pattern that matched it
  auto extents = std::make_shared<detail::ActivationExtents>();  // shared by the plan's hooks
  for (const auto& [pattern, style] : plan.entries()) {
    TORCH_CHECK(style, "titan::parallelize_module: plan entry '", pattern, "' has no style");
    const auto targets = modules_matching(module, pattern);
    TORCH_CHECK(!targets.empty(), "titan::parallelize_module: plan entry '", pattern, "' matches no module of '",
                module.name(), "' ('*' matches within one dotted component; \"\" is the root). Its modules include ",
                detail::module_names_like(module, pattern));
    for (const auto& [name, target] : targets) {
      auto [it, fresh] = claimed.emplace(name, pattern);
      TORCH_CHECK(fresh, "titan::parallelize_module: module '", name, "' is matched by plan entries '", it->second,
                  "' and '", pattern, "'");
      style->apply(*target, name.empty() ? std::string("<root>") : name, tp_group, mesh_dim);
      for (const auto& hook : hooks_of(*target))
        if (auto attached = std::dynamic_pointer_cast<ParallelStyle>(hook)) attached->share_extents(extents);
    }
  }
}

/// parallelize_module over a 1-D mesh (e.g. mesh["tp"]).
template <typename M>
void parallelize_module(M&& module, const DeviceMesh& tp_mesh, const ParallelizePlan& plan) {
  TORCH_CHECK(tp_mesh.ndim() == 1, "titan::parallelize_module needs a 1-D mesh (e.g. mesh[\"tp\"]), got ",
              tp_mesh.ndim(), " dimensions");
  const auto& dim = tp_mesh.dim_names()[0];
  parallelize_module(std::forward<M>(module), tp_mesh.group(dim), plan, dim);
}

/// Loss parallel: the cross-entropy of logits sharded on the vocabulary (the local output of a
/// ColwiseParallel output layer, [..., vocab / tp]) against `targets` [...] (global token ids),
/// without gathering the logits: the row maximum and the sum of exponentials are all-reduced, and
/// the target's logit is picked on the rank owning it. Targets equal to `ignore_index` are skipped.
/// `reduction` (at::Reduction, as at::cross_entropy_loss): Mean over the other targets (NaN if
/// there are none, as at::cross_entropy), Sum, or None (the per-target losses [...], 0 where
/// ignored). The result is the same on every rank; backward gives each rank the gradient of its
/// logits chunk. `vocab_size` is the whole vocabulary (the output layer's features), which gives
/// every rank's chunk; -1 exchanges the chunk sizes (one small collective and a host read).
inline at::Tensor loss_parallel_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                              const ProcessGroupPtr& tp_group, int64_t ignore_index = -100,
                                              int64_t reduction = at::Reduction::Mean, int64_t vocab_size = -1) {
  detail::check_group(tp_group, "loss_parallel_cross_entropy");
  TORCH_CHECK(logits.dim() >= 1 && logits.sizes().slice(0, logits.dim() - 1) == targets.sizes(),
              "titan: loss_parallel_cross_entropy needs logits [..., vocab / tp] and targets [...], got ",
              logits.sizes(), " and ", targets.sizes());
  TORCH_CHECK(!at::isFloatingType(targets.scalar_type()), "titan: loss_parallel_cross_entropy needs integer targets");
  TORCH_CHECK(reduction == at::Reduction::Mean || reduction == at::Reduction::Sum || reduction == at::Reduction::None,
              "titan: loss_parallel_cross_entropy: unknown reduction ", reduction,
              " (expected at::Reduction::None, Mean or Sum)");
  const int64_t last = logits.dim() - 1;
  std::vector<int64_t> sizes;  // every rank's vocabulary chunk
  if (tp_group->size() == 1) {
    sizes = {logits.size(last)};
  } else if (vocab_size >= 0) {
    sizes = chunk_sizes(vocab_size, tp_group->size());
    TORCH_CHECK(sizes[static_cast<size_t>(tp_group->rank())] == logits.size(last), "titan: loss_parallel_cross_entropy: ",
                "this rank's logits have ", logits.size(last), " vocabulary entries, but a vocabulary of ", vocab_size,
                " splits into ", c10::IntArrayRef(sizes), " over ", tp_group->size(), " ranks");
  } else {
    sizes = detail::exchange_sizes(logits, *tp_group, last);
  }
  const int64_t start = chunk_offset(sizes, tp_group->rank());
  const int64_t end = start + logits.size(last);

  auto x = logits.to(at::kFloat);  // [..., V_local]
  at::Tensor row_max;              // [...], the global maximum: a constant for the gradient
  {
    at::NoGradGuard no_grad;
    row_max = detail::all_reduce_raw(std::get<0>(x.max(last)), *tp_group, ReduceOp::Max);
  }
  auto shifted = x - row_max.unsqueeze(-1);  // [..., V_local]
  auto valid = targets != ignore_index;      // [...]
  auto mine = valid.logical_and(targets >= start).logical_and(targets < end);
  auto local_ids = (targets - start).masked_fill(mine.logical_not(), 0).to(at::kLong);
  auto picked = shifted.gather(last, local_ids.unsqueeze(-1)).squeeze(-1).masked_fill(mine.logical_not(), 0.0);
  // One all-reduce for both sums: [2, ...] = (sum of exponentials, target logit) over the vocabulary.
  auto sums = reduce_from_group(at::stack({shifted.exp().sum(last), picked}), tp_group);
  auto per_token = (sums[0].log() - sums[1]).masked_fill(valid.logical_not(), 0.0);  // [...]
  if (reduction == at::Reduction::None) return per_token;
  if (reduction == at::Reduction::Sum) return per_token.sum();
  return per_token.sum() / valid.sum().to(per_token.scalar_type());
}

}  // namespace titan
