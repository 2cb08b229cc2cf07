#pragma once
// titan/fsdp.hpp: fully sharded data parallelism with per-parameter sharding (PyTorch's FSDP2).
//
//   titan::DeviceMesh mesh(world, {"dp_shard"}, {world->world_size()});
//   for (auto& block : *model->layers) titan::fully_shard(*block, mesh);
//   titan::fully_shard(*model, mesh);            // the root: what no block owns
//   torch::optim::AdamW optimizer(model->parameters(), ...);   // sees the local shards
//   auto loss = loss_fn(titan::call(model, batch));
//   loss.backward();                             // gradients reduce-scattered into the shards
//   optimizer.step();
//
// Each parameter of a unit is split along dim 0 in torch.chunk parts across the "dp_shard" mesh
// dimension (uneven sizes padded internally). The module's parameter dictionary gets the local
// shard (what optimizers, clipping and state dicts see); the member the user's forward reads keeps
// the original TensorImpl as the unsharded parameter, whose storage is all-gathered before the
// unit runs and resized to 0 bytes after (docs/design.md, section 4). Units must be called through
// titan::call. See docs/fsdp.md.

#include <titan/collectives.hpp>
#include <titan/detail/autograd.hpp>
#include <titan/detail/torch_internals.hpp>
#include <titan/hooks.hpp>
#include <titan/mesh.hpp>
#include <titan/sharding.hpp>

#include <ATen/record_function.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

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
};

/// Counters of what a unit did, for diagnostics and tests.
struct FsdpStats {
  int64_t all_gathers = 0;        ///< all-gathers issued (prefetched or not)
  int64_t prefetches = 0;         ///< of which started ahead of use (forward or backward prefetch)
  int64_t reduce_scatters = 0;    ///< gradient reductions issued
  int64_t all_gather_bytes = 0;   ///< bytes this rank contributed to its all-gathers (its shards as sent)
};

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

class FsdpHook;

namespace detail {

/// `view`'s elements as a tensor of its own, sharing the base's storage but neither its version
/// counter (writing through it does not invalidate what autograd saved of the base, like PyTorch's
/// _unsafe_preserve_version_counter) nor its autograd view link (which LibTorch's
/// Optimizer::zero_grad could not detach in place).
inline at::Tensor storage_alias(const at::Tensor& view) {
  at::NoGradGuard no_grad;
  return at::empty({0}, view.options()).set_(view.storage(), view.storage_offset(), view.sizes(), view.strides());
}

/// The hooks of type H in `module`'s subtree, itself included, in pre-order.
template <typename H>
std::vector<std::shared_ptr<H>> hooks_in_subtree(const torch::nn::Module& module) {
  std::vector<std::shared_ptr<H>> found;
  visit_modules(module, "", [&found](const std::string&, const torch::nn::Module& m) {
    if (auto hook = find_hook<H>(m)) found.push_back(hook);
  });
  return found;
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

/// Shared by the units under one root: orders, the pending reduction, the backward callback.
struct FsdpContext {
  std::vector<FsdpHook*> units;               ///< every unit under the root, pre-order
  std::vector<FsdpHook*> pre_forward_order;   ///< this forward's pre-forward order
  std::vector<FsdpHook*> last_forward_order;  ///< the previous forward's (forward prefetch)
  std::vector<FsdpHook*> post_forward_order;  ///< this forward's post-forward order (backward prefetch)
  bool callback_queued = false;
};

}  // namespace detail

/// The state fully_shard attaches to one module (a "unit"): its parameters' shards, the
/// all-gather / reduce-scatter logic and the hooks titan::call runs around forward. Also reports
/// the sharded parameters' layouts for state dicts.
class FsdpHook : public ModuleHook, public ParameterLayoutProvider, public std::enable_shared_from_this<FsdpHook> {
 public:
  /// One parameter managed by the unit.
  struct Param {
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

  FsdpHook(std::vector<Param> params, ProcessGroupPtr shard_group, ProcessGroupPtr replicate_group,
           FsdpOptions options, std::string module_name)
      : params_(std::move(params)),
        shard_group_(std::move(shard_group)),
        replicate_group_(std::move(replicate_group)),
        options_(std::move(options)),
        module_name_(std::move(module_name)) {
    for (size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i];
      p.flat_offset = flat_numel_;
      flat_numel_ += p.padded_numel();
      // One all-gather buffer for the plain parameters (the compute dtype), one per custom dtype.
      if (buckets_.empty()) buckets_.emplace_back(compute_dtype(p));
      const auto dtype = gathered_dtype(p);
      p.bucket = 0;
      if (p.custom_gather) {
        auto it = std::find_if(buckets_.begin() + 1, buckets_.end(), [dtype](const auto& b) { return b.dtype == dtype; });
        p.bucket = it == buckets_.end() ? buckets_.size() : static_cast<size_t>(it - buckets_.begin());
        if (it == buckets_.end()) buckets_.emplace_back(dtype);
      }
      auto& bucket = buckets_[p.bucket];
      p.gather_offset = bucket.flat_numel;
      bucket.flat_numel += p.padded_numel();
      bucket.members.push_back(i);
      bucket.split_sizes.push_back(p.padded_numel());
    }
    const int world = shard_group_->size();
    for (auto& bucket : buckets_) {
      if (bucket.members.empty()) continue;
      const auto& first = params_[bucket.members.front()].sharded;
      allocate(bucket, first.device(), world);
      if (!first.is_meta()) detail::resize_storage_bytes(bucket.storage, 0);
    }
    // Each member handle is the placeholder until the first all-gather fills the unit's storage.
    for (auto& p : params_) detail::repoint_tensor(p.unsharded, p.placeholder);
  }

  std::string name() const override { return "fully_shard"; }
  HookKind kind() const override { return HookKind::FullyShard; }

  int64_t unsharded_bytes() const override {
    int64_t bytes = 0;
    for (const auto& bucket : buckets_)
      if (bucket.storage.defined() && !bucket.storage.is_meta())
        bytes += static_cast<int64_t>(bucket.storage.storage().nbytes());
    for (const auto& p : params_) bytes += detail::tensor_bytes(p.unsharded.grad());
    return bytes;
  }

  /// Every trainable parameter of the model belongs to a unit: a parameter outside every unit
  /// (fully_shard on the blocks but not on the root) would never have its gradient reduced, and
  /// the replicas would drift apart.
  void verify_model(const torch::nn::Module& root) const override {
    std::unordered_set<const c10::TensorImpl*> owned;
    for (const auto& unit : detail::hooks_in_subtree<FsdpHook>(root))
      for (const auto& p : unit->params()) owned.insert(p.sharded.unsafeGetTensorImpl());
    std::string outside;
    int count = 0;
    for (const auto& item : root.named_parameters(/*recurse=*/true)) {
      if (!item.value().requires_grad() || owned.count(item.value().unsafeGetTensorImpl())) continue;
      if (count++ < 3) outside += (outside.empty() ? "'" : ", '") + item.key() + "'";
    }
    TORCH_CHECK(count == 0, "titan::fully_shard: ", count, " trainable parameter(s) of '", root.name(),
                "' belong to no fully_shard unit (", outside, count > 3 ? ", ..." : "",
                "): their gradients are never reduced across the data-parallel ranks, so the replicas drift apart. ",
                "Apply titan::fully_shard to the root module too, after its blocks: fully_shard(model, mesh)");
  }

  std::optional<TensorLayout> layout_of(const std::string& relative_name) const override {
    for (const auto& p : params_)
      if (std::find(p.names.begin(), p.names.end(), relative_name) != p.names.end()) return p.layout;
    return std::nullopt;
  }

  /// The parameters this unit manages.
  const std::vector<Param>& params() const { return params_; }
  const FsdpOptions& options() const { return options_; }
  /// The group the parameters are sharded over.
  const ProcessGroupPtr& shard_group() const { return shard_group_; }
  const FsdpStats& stats() const { return stats_; }
  /// Whether this unit is the root of the units it was called with (known after the first call).
  bool is_root() const { return context_ && context_->units.front() == this; }
  /// Whether the unsharded parameters currently hold memory.
  bool is_unsharded() const { return state_ == State::Unsharded; }
  /// When false, backward accumulates the unsharded gradients locally and skips the reduction
  /// (gradient-accumulation micro-steps); the next backward with true reduces the sum.
  void set_requires_gradient_sync(bool sync) { requires_gradient_sync_ = sync; }
  bool requires_gradient_sync() const { return requires_gradient_sync_; }
  /// When false, the unsharded parameters stay gathered after backward and across the root's next
  /// forwards (micro-batches of one step: one all-gather for all of them); the next backward with
  /// true frees them. The optimizer must not change the shards while it is false.
  void set_reshard_after_backward(bool reshard) { reshard_after_backward_ = reshard; }
  bool reshard_after_backward() const { return reshard_after_backward_; }

  /// All-gathers the parameters into the unsharded handles (no-op if already there).
  void unshard() {
    if (state_ == State::Resharded) start_all_gather(false);
    if (state_ == State::Gathering) finish_all_gather();
  }

  /// Frees the unsharded parameters' storage (their gradients, if kept for accumulation, stay).
  void reshard() {
    if (state_ == State::Gathering) finish_all_gather();
    if (state_ != State::Unsharded) return;
    for (auto& p : params_) {
      detail::repoint_tensor(p.unsharded, p.placeholder);
      if (p.custom_gather) p.custom_gather->post_reshard();
    }
    if (!aliases_shards())
      for (auto& bucket : buckets_)
        if (bucket.storage.defined()) detail::resize_storage_bytes(bucket.storage, 0);
    state_ = State::Resharded;
  }

  at::Tensor forward(torch::nn::Module& module, const TensorList& inputs, const ForwardFn& next) override {
    if (!context_) become_root(module);
    const bool grad = torch::autograd::GradMode::is_enabled();
    if (is_root()) root_pre_forward();
    pre_forward();
    TensorList prepared = inputs;
    if (grad) {
      // Post-backward: an identity node on the inputs runs once the unit's gradients are done.
      torch::autograd::variable_list ins, outs;
      std::vector<size_t> where;
      for (size_t i = 0; i < prepared.size(); ++i) {
        if (prepared[i].defined() && prepared[i].requires_grad()) {
          ins.push_back(prepared[i]);
          outs.push_back(prepared[i].detach());
          where.push_back(i);
        }
      }
      if (!ins.empty()) {
        std::weak_ptr<FsdpHook> self = weak_from_this();
        detail::connect_backward(ins, outs, "titan::FsdpPostBackward",
                                 [self](torch::autograd::variable_list&& grads) {
                                   if (auto hook = self.lock()) hook->post_backward();
                                   return std::move(grads);
                                 });
        for (size_t k = 0; k < where.size(); ++k) prepared[where[k]] = outs[k];
      }
    }
    if (options_.param_dtype() && options_.cast_forward_inputs()) {
      for (auto& t : prepared)
        if (t.defined() && t.is_floating_point()) t = t.to(*options_.param_dtype());
    }
    at::Tensor output = next(prepared);
    post_forward(output, grad);
    return output;
  }

  /// Reduces this unit's unsharded gradients into the sharded parameters' .grad (or keeps them
  /// when gradient sync is off) and frees the unsharded parameters (unless reshard_after_backward
  /// is off). Run by backward.
  void post_backward() {
    if (!needs_post_backward_) return;
    needs_post_backward_ = false;
    if (requires_gradient_sync_) {
      bool any = false;
      for (const auto& p : params_) any = any || p.unsharded.grad().defined();
      if (any) start_reduce_scatter();
    }
    if (reshard_after_backward_) reshard();
  }

  /// Waits for this unit's reduction in flight, if any, and writes the sharded gradients.
  void finish_reduce_scatter() {
    if (!reduce_work_ && !reduce_output_.defined()) return;
    if (reduce_work_) reduce_work_->wait();
    reduce_work_.reset();
    at::Tensor out = reduce_output_;  // [flat_numel]: this rank's padded chunks, summed / world
    reduce_input_ = at::Tensor();
    reduce_output_ = at::Tensor();
    if (replicate_group_) detail::all_reduce_raw_(out, *replicate_group_, ReduceOp::Sum);  // HSDP: over replicas
    at::NoGradGuard no_grad;
    const int rank = shard_group_->rank();
    for (auto& p : params_) {
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

 private:
  enum class State { Resharded, Gathering, Unsharded };

  at::ScalarType compute_dtype(const Param& p) const {
    return options_.param_dtype().value_or(p.sharded.scalar_type());
  }

  /// The dtype `p` travels and is kept unsharded in.
  at::ScalarType gathered_dtype(const Param& p) const {
    return p.custom_gather ? p.custom_gather->gather_dtype() : compute_dtype(p);
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

  /// Fresh storage of `bucket` (its dtype, on `device`) for `world` ranks, each member's
  /// `storage` a part of it, and each member's placeholder on `device`.
  void allocate(GatherBucket& bucket, const at::Device& device, int world) {
    int64_t total = 0;
    for (size_t i : bucket.members) total += world * params_[i].padded_numel();
    bucket.storage = at::empty({total}, at::TensorOptions().dtype(bucket.dtype).device(device));  // [total]
    int64_t offset = 0;
    for (size_t i : bucket.members) {
      auto& p = params_[i];
      p.storage = bucket.storage.narrow(0, offset, world * p.padded_numel());  // [world * padded_numel]
      p.make_placeholder(device, compute_dtype(p));
      offset += world * p.padded_numel();
    }
  }

  /// What this rank sends of each parameter: its shard, or the custom gather's form of it, whose
  /// statistics (e.g. amaxes) are reduced first in one all-reduce per group.
  std::vector<at::Tensor> shards_to_send() {
    std::vector<at::Tensor> sent;
    std::vector<at::Tensor> statistics;
    std::vector<size_t> owners;
    for (size_t i = 0; i < params_.size(); ++i) {
      sent.push_back(params_[i].sharded);
      if (!params_[i].custom_gather) continue;
      auto statistic = params_[i].custom_gather->shard_statistic(params_[i].sharded);
      if (!statistic.defined()) continue;
      statistics.push_back(statistic.reshape({1}).to(at::kFloat));
      owners.push_back(i);
    }
    at::Tensor reduced;  // [statistics]
    if (!statistics.empty()) {
      reduced = at::cat(statistics);
      detail::max_over_groups(reduced, std::vector<ProcessGroupPtr>(owners.size(), shard_group_));
      std::vector<ProcessGroupPtr> further;  // e.g. tensor parallel
      for (size_t i : owners) further.push_back(params_[i].custom_gather->statistic_group());
      detail::max_over_groups(reduced, further);
    }
    for (size_t i = 0, k = 0; i < params_.size(); ++i) {
      auto& p = params_[i];
      if (!p.custom_gather) continue;
      const bool has = k < owners.size() && owners[k] == i;
      sent[i] = p.custom_gather->pre_all_gather(p.sharded, has ? reduced[static_cast<int64_t>(k)] : at::Tensor());
      if (has) ++k;
      TORCH_CHECK(sent[i].scalar_type() == p.custom_gather->gather_dtype() && sent[i].sizes() == p.sharded.sizes(),
                  "titan::fully_shard: the custom gather of '", module_name_, ".", p.names.front(), "' sent a ",
                  sent[i].scalar_type(), " tensor of shape ", sent[i].sizes(), "; expected ",
                  p.custom_gather->gather_dtype(), " of the shard's shape ", p.sharded.sizes());
    }
    return sent;
  }

  /// Adds `grad` (this rank's reduced block, the sharded parameter's dtype) to the sharded .grad.
  static void accumulate_grad(Param& p, at::Tensor grad) {
    auto& slot = p.sharded.mutable_grad();
    if (slot.defined()) {
      slot.add_(grad);
    } else {
      slot = grad.contiguous();
    }
  }

  void become_root(torch::nn::Module& module) {
    auto context = std::make_shared<detail::FsdpContext>();
    std::unordered_map<c10::TensorImpl*, std::string> seen;
    for (const auto& hook : detail::hooks_in_subtree<FsdpHook>(module)) {
      context->units.push_back(hook.get());
      hook->context_ = context;
      for (const auto& p : hook->params_) {
        auto where = hook->module_name_ + "." + p.names.front();
        auto [it, fresh] = seen.emplace(p.unsharded.unsafeGetTensorImpl(), where);
        TORCH_CHECK(fresh, "titan::fully_shard: parameter '", where, "' is the same tensor as '", it->second,
                    "' of another unit; tied (shared) parameters must belong to one unit: apply fully_shard ",
                    "to a module holding both, or untie them");
      }
    }
    TORCH_CHECK(context->units.front() == this, "titan::fully_shard: internal error: root is not first");
  }

  void root_pre_forward() {
    // Anything left unsharded by a forward without backward (eval, or reshard_after_forward off)
    // is refreshed from the shards, which the optimizer may have changed since; units kept
    // gathered for the micro-batches of a step (reshard_after_backward off) stay.
    for (auto* unit : context_->units)
      if (unit->reshard_after_backward_) unit->reshard();
    context_->pre_forward_order.clear();
    context_->post_forward_order.clear();
  }

  void pre_forward() {
    unshard();
    auto& order = context_->pre_forward_order;
    if (std::find(order.begin(), order.end(), this) == order.end()) order.push_back(this);
    if (options_.forward_prefetch()) {
      const auto& last = context_->last_forward_order;
      auto it = std::find(last.begin(), last.end(), this);
      if (it != last.end() && it + 1 != last.end()) (*(it + 1))->prefetch();
    }
  }

  void post_forward(const at::Tensor& output, bool grad) {
    auto& order = context_->post_forward_order;
    if (std::find(order.begin(), order.end(), this) == order.end()) order.push_back(this);
    if (is_root()) context_->last_forward_order = context_->pre_forward_order;
    const bool reshard_now = !grad || (options_.reshard_after_forward() && !is_root());
    if (reshard_now) reshard();
    if (grad && output.requires_grad()) {
      std::weak_ptr<FsdpHook> self = weak_from_this();
      output.register_hook([self](at::Tensor) {
        if (auto hook = self.lock()) hook->pre_backward();
      });
    }
  }

  void prefetch() {
    if (state_ == State::Resharded) start_all_gather(true);
  }

  void pre_backward() {
    if (!context_->callback_queued) {
      context_->callback_queued = true;
      std::weak_ptr<detail::FsdpContext> weak = context_;
      detail::queue_end_of_backward([weak] {
        if (auto context = weak.lock()) finish_backward(*context);
      });
    }
    if (needs_post_backward_) return;  // a second output of the same call
    needs_post_backward_ = true;
    unshard();
    if (options_.backward_prefetch()) {
      // The unit that finished forward just before this one runs backward next.
      const auto& order = context_->post_forward_order;
      auto it = std::find(order.begin(), order.end(), this);
      if (it != order.end() && it != order.begin()) (*(it - 1))->prefetch();
    }
  }

  /// End of backward: reduce what no post-backward node reached, wait every reduction, reshard.
  static void finish_backward(detail::FsdpContext& context) {
    const auto& order = context.post_forward_order;
    for (auto it = order.rbegin(); it != order.rend(); ++it) (*it)->post_backward();
    for (auto* unit : context.units) {
      unit->finish_reduce_scatter();
      if (unit->reshard_after_backward_) unit->reshard();
    }
    context.callback_queued = false;
  }

  /// One rank whose compute dtype is the shards' own: the unsharded parameters are the shards
  /// themselves (no buffer, no copy; reshard only points the members back at the placeholder).
  bool aliases_shards() const {
    if (shard_group_->size() != 1) return false;
    for (const auto& p : params_)
      if (p.custom_gather || compute_dtype(p) != p.sharded.scalar_type()) return false;
    return true;
  }

  void start_all_gather(bool prefetched) {
    const int world = shard_group_->size();
    auto& first = params_.front().sharded;
    TORCH_CHECK(!first.is_meta() || shard_group_->device().is_meta(), "titan::fully_shard: the parameters of '",
                module_name_, "' are still on the meta device; call titan::to_empty(model, device) and initialise them ",
                "first");
    state_ = State::Gathering;
    ++stats_.all_gathers;
    if (prefetched) ++stats_.prefetches;
    if (aliases_shards()) return;  // finish_all_gather points the members at the shards
    at::NoGradGuard no_grad;
    const auto sent = shards_to_send();
    for (auto& bucket : buckets_) {
      if (bucket.members.empty()) continue;
      if (world == 1) {  // finish_all_gather copies (and casts) the shards: nothing to gather
        bucket.sent.clear();
        for (size_t i : bucket.members) bucket.sent.push_back(sent[i]);
        continue;
      }
      // Padding rows stay uninitialised: they travel with the collective but are never read.
      auto input = at::empty({bucket.flat_numel}, first.options().dtype(bucket.dtype));  // [flat_numel]
      {
        RECORD_USER_SCOPE("titan::fsdp::all_gather_copy_in");
        std::vector<at::Tensor> slots, shards;
        for (size_t i : bucket.members) {
          const auto& p = params_[i];
          if (p.sharded.numel() == 0) continue;
          slots.push_back(input.narrow(0, p.gather_offset, p.sharded.numel()).view(p.sharded.sizes()));
          shards.push_back(sent[i]);
        }
        if (!slots.empty()) at::_foreach_copy_(slots, shards);  // one foreach copy (and cast) per buffer
      }
      stats_.all_gather_bytes += static_cast<int64_t>(input.nbytes());
      bucket.input = input;
      bucket.output = at::empty({world * bucket.flat_numel}, input.options());  // [world * flat_numel]
      // On NCCL, c10d orders the collective after the current stream's work and records the
      // buffers on its stream; wait() makes the current stream wait for it.
      // Float8 travels as bytes (Gloo has no float8 type; an all-gather does no arithmetic).
      const bool bytes = c10::isFloat8Type(bucket.dtype);
      auto send = bytes ? input.view(at::kByte) : input, receive = bytes ? bucket.output.view(at::kByte) : bucket.output;
      bucket.work = shard_group_->backend()->_allgather_base(receive, send);
    }
  }

  void finish_all_gather() {
    for (auto& bucket : buckets_) {
      if (bucket.work) bucket.work->wait();
      bucket.work.reset();
    }
    const int world = shard_group_->size();
    at::NoGradGuard no_grad;
    state_ = State::Unsharded;
    if (aliases_shards()) {
      for (auto& p : params_) detail::repoint_tensor(p.unsharded, p.sharded);
      return;
    }
    RECORD_USER_SCOPE("titan::fsdp::all_gather_copy_out");
    for (auto& bucket : buckets_) {
      if (bucket.members.empty()) continue;
      const auto& device = params_[bucket.members.front()].sharded.device();
      if (bucket.storage.device() != device) allocate(bucket, device, world);  // the model moved (meta -> device)
      detail::resize_storage_bytes(bucket.storage,
                                   static_cast<size_t>(bucket.storage.numel()) * bucket.storage.element_size());
      std::vector<at::Tensor> chunks;  // each parameter's storage as [world, padded_numel]
      for (size_t i : bucket.members) {
        auto& p = params_[i];
        // A custom gather's member is the placeholder (of this device: the model may have been
        // sharded on meta): its hook computes from the gathered form, the gradient reaches it.
        detail::repoint_tensor(p.unsharded, p.custom_gather ? p.placeholder : p.full());
        chunks.push_back(detail::storage_alias(p.storage).view({world, p.padded_numel()}));
      }
      if (world == 1) {
        std::vector<at::Tensor> shards;  // cast to the gathered dtype
        for (size_t k = 0; k < bucket.members.size(); ++k)
          shards.push_back(bucket.sent[k].view({1, params_[bucket.members[k]].padded_numel()}));
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
    for (auto& p : params_)
      if (p.custom_gather) p.custom_gather->post_all_gather(p.full());
  }

  void start_reduce_scatter() {
    // One reduction in flight per context: finish the previous unit's before issuing this one.
    for (auto* unit : context_->units) unit->finish_reduce_scatter();
    const int world = shard_group_->size();
    const auto& first = params_.front();
    auto dtype = options_.reduce_dtype().value_or(compute_dtype(first));
    const bool replicated = replicate_group_ && replicate_group_->size() > 1;
    int64_t dp_size = world * (replicated ? replicate_group_->size() : 1);
    ++stats_.reduce_scatters;
    at::NoGradGuard no_grad;
    if (!replicated && world == 1) {
      // One rank: nothing to reduce. Each gradient moves to its shard (rounded through the
      // reduction dtype when that differs from both, as a reduction would); an unused parameter
      // gets zeros. The unit's casts are one foreach copy, not a kernel per parameter.
      std::vector<Param*> cast_params;
      std::vector<at::Tensor> casts, grads;
      for (auto& p : params_) {
        auto& grad = p.unsharded.mutable_grad();
        const auto target = p.sharded.scalar_type();
        const bool one_cast = grad.defined() && grad.scalar_type() != target &&
                              (dtype == grad.scalar_type() || dtype == target);
        if (p.sharded.requires_grad() && one_cast) {
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
      return;
    }
    auto input = at::empty({world * flat_numel_}, first.sharded.options().dtype(dtype));  // [world * flat_numel]
    {
      RECORD_USER_SCOPE("titan::fsdp::reduce_scatter_copy_in");
      // Row r of [world, flat_numel] is rank r's padded chunk of every gradient, zero-padded; an
      // unused parameter contributes zeros.
      std::vector<at::Tensor> grads;
      for (auto& p : params_) {
        auto& grad = p.unsharded.mutable_grad();
        grads.push_back(!grad.defined() ? at::zeros(p.shape, input.options())
                        : grad.scalar_type() == dtype ? grad : grad.to(dtype));
        grad = at::Tensor();  // the unsharded gradient is freed once copied
      }
      auto rows = input.view({world, flat_numel_});  // [world, flat_numel]
      at::_chunk_cat_out(rows, grads, 0, world);
    }
    if (dp_size > 1) input.div_(dp_size);  // average over data-parallel ranks (pre-divided: no overflow)
    reduce_input_ = input;
    if (world == 1) {
      reduce_output_ = input;
    } else {
      reduce_output_ = at::empty({flat_numel_}, input.options());  // [flat_numel]
      reduce_work_ = shard_group_->backend()->_reduce_scatter_base(reduce_output_, reduce_input_);
    }
  }

  std::vector<Param> params_;
  ProcessGroupPtr shard_group_;
  ProcessGroupPtr replicate_group_;
  FsdpOptions options_;
  std::string module_name_;
  int64_t flat_numel_ = 0;             ///< elements of a rank's part of the gradient reduction
  std::vector<GatherBucket> buckets_;  ///< the all-gather buffers (one per gathered dtype)

  std::shared_ptr<detail::FsdpContext> context_;
  State state_ = State::Resharded;
  bool needs_post_backward_ = false;
  bool requires_gradient_sync_ = true;
  bool reshard_after_backward_ = true;
  FsdpStats stats_;

  c10::intrusive_ptr<c10d::Work> reduce_work_;
  at::Tensor reduce_input_, reduce_output_;
};

namespace detail {

/// What a hook on `owner` asks FSDP to gather its parameter `key` as, or nullptr.
inline std::shared_ptr<FsdpParamGather> custom_gather(torch::nn::Module& owner, const std::string& key) {
  for (const auto& hook : hooks_of(owner))
    if (auto* provider = dynamic_cast<FsdpGatherProvider*>(hook.get()))
      if (auto gather = provider->fsdp_gather(key)) return gather;
  return nullptr;
}

/// Parameters of `module` not owned by a unit below it, with their dotted names relative to it.
inline void collect_unit_parameters(torch::nn::Module& module, const std::string& prefix,
                                    std::vector<std::tuple<std::string, torch::nn::Module*, std::string>>& out) {
  for (auto& item : parameter_dict(module)) {
    // An undefined entry is a parameter the module does without (Linear's bias with bias(false)).
    if (item.value().defined()) out.emplace_back(prefix + item.key(), &module, item.key());
  }
  for (const auto& child : module.named_children()) {
    if (child.key() == kHookSlotName || find_hook<FsdpHook>(*child.value())) continue;
    collect_unit_parameters(*child.value(), prefix + child.key() + ".", out);
  }
}

}  // namespace detail

/// Shards `module`'s parameters (those no unit below it owns) along dim 0 across the mesh's shard
/// dimension and attaches the FSDP hook run by titan::call. `mesh` is 1-D (shard dim, e.g.
/// mesh["dp_shard"]) or 2-D for HSDP (replicate dim, shard dim: mesh.slice({"dp_replicate",
/// "dp_shard"})): gradients are reduce-scattered over the shard dim, then all-reduced over the
/// replicate dim. Apply it bottom-up (blocks, then the root). `module` may be a module, a
/// ModuleHolder or a pointer to one. Returns the unit's hook.
template <typename M>
std::shared_ptr<FsdpHook> fully_shard(M&& module_like, const DeviceMesh& mesh, FsdpOptions options = {}) {
  torch::nn::Module& module = detail::module_ref(module_like);
  TORCH_CHECK(mesh.ndim() == 1 || mesh.ndim() == 2, "titan::fully_shard: the mesh must be 1-D (shard) or 2-D ",
              "(replicate, shard) but has ", mesh.ndim(), " dimensions");
  TORCH_CHECK(!find_hook<FsdpHook>(module), "titan::fully_shard: module '", module.name(), "' is already sharded");
  const std::string shard_dim = mesh.dim_names().back();
  ProcessGroupPtr shard_group = mesh.group(shard_dim);
  ProcessGroupPtr replicate_group = mesh.ndim() == 2 ? mesh.group(mesh.dim_names().front()) : nullptr;
  TORCH_CHECK(shard_group, "titan::fully_shard: this rank is not in the mesh's '", shard_dim, "' group");
  if (auto pt = options.param_dtype())
    TORCH_CHECK(at::isFloatingType(*pt), "titan::fully_shard: param_dtype must be floating point, got ", *pt);

  // Parameters already managed by units below: a tie to one of them cannot be sharded twice.
  std::unordered_map<c10::TensorImpl*, std::string> below;
  module.apply([&below](torch::nn::Module& m) {
    if (auto hook = find_hook<FsdpHook>(m))
      for (const auto& p : hook->params()) below.emplace(p.unsharded.unsafeGetTensorImpl(), p.names.front());
  });

  std::vector<std::tuple<std::string, torch::nn::Module*, std::string>> entries;
  detail::collect_unit_parameters(module, "", entries);
  TORCH_CHECK(!entries.empty(), "titan::fully_shard: module '", module.name(),
              "' has no parameters of its own (all belong to units below it)");
  // Check every entry before changing anything, so a refused call leaves the model intact.
  for (auto& [name, owner, key] : entries) {
    const at::Tensor& tensor = detail::parameter_dict(*owner)[key];
    auto tied = below.find(tensor.unsafeGetTensorImpl());
    TORCH_CHECK(tied == below.end(), "titan::fully_shard: parameter '", name, "' of '", module.name(),
                "' is the same tensor as '", tied == below.end() ? "" : tied->second,
                "' of a unit already sharded below it; tied (shared) parameters must belong to one unit");
    TORCH_CHECK(tensor.is_meta() || tensor.storage().nbytes() >= static_cast<size_t>(tensor.numel()) * tensor.element_size(),
                "titan::fully_shard: parameter '", name, "' of '", module.name(), "' has no memory: it is the ",
                "unsharded parameter of another fully_shard unit; tied (shared) parameters must belong to one unit");
    TORCH_CHECK(tensor.dim() >= 1, "titan::fully_shard: parameter '", name, "' is 0-dimensional; FSDP shards dim 0 ",
                "(give it shape [1])");
    // One flat buffer per unit carries every parameter: they need one dtype to gather in.
    const auto& [first_name, first_owner, first_key] = entries.front();
    const auto first_dtype = detail::parameter_dict(*first_owner)[first_key].scalar_type();
    TORCH_CHECK(options.param_dtype() || tensor.scalar_type() == first_dtype, "titan::fully_shard: parameter '", name,
                "' of '", module.name(), "' is ", tensor.scalar_type(), " but '", first_name, "' is ", first_dtype,
                "; one unit gathers its parameters in one dtype: convert them to one dtype, set ",
                "FsdpOptions().param_dtype(...), or shard them in separate units");
  }
  std::vector<FsdpHook::Param> params;
  std::unordered_map<c10::TensorImpl*, size_t> index;
  const int world = shard_group->size();
  const int rank = shard_group->rank();
  for (auto& [name, owner, key] : entries) {
    at::Tensor tensor = detail::parameter_dict(*owner)[key];
    auto* impl = tensor.unsafeGetTensorImpl();
    if (auto it = index.find(impl); it != index.end()) {  // tied inside this unit: one shard for both
      params[it->second].names.push_back(name);
      params[it->second].owners.emplace_back(owner, key);
      continue;
    }
    FsdpHook::Param p;
    p.names = {name};
    p.owners = {{owner, key}};
    p.layout = parameter_layout(module, name, tensor).with_level(ShardLevel{0, shard_dim, shard_group, {}});
    p.shape = tensor.sizes().vec();
    p.rows = chunk_sizes(p.shape[0], world);
    p.padded_rows = p.rows.front();
    p.row_numel = p.shape[0] == 0 ? 0 : tensor.numel() / p.shape[0];
    const int64_t offset = chunk_offset(p.rows, rank);
    {
      at::NoGradGuard no_grad;
      at::Tensor local = tensor.narrow(0, offset, p.rows[static_cast<size_t>(rank)]);
      p.sharded = tensor.is_meta() ? at::empty(local.sizes(), tensor.options()) : local.clone(at::MemoryFormat::Contiguous);
      p.sharded.set_requires_grad(tensor.requires_grad());
      // The member handle becomes the unsharded parameter (FsdpHook points it at the placeholder
      // until the first all-gather fills the unit's storage).
      tensor.mutable_grad() = at::Tensor();
      p.unsharded = tensor;
      p.custom_gather = detail::custom_gather(*owner, key);
    }
    index.emplace(impl, params.size());
    params.push_back(std::move(p));
  }
  for (const auto& p : params)
    for (const auto& [owner, key] : p.owners) detail::parameter_dict(*owner)[key] = p.sharded;
  auto hook = std::make_shared<FsdpHook>(std::move(params), std::move(shard_group), std::move(replicate_group),
                                         std::move(options), module.name());
  attach_hook(module, hook);
  return hook;
}

/// Turns gradient reduction on or off for every unit in `module`'s subtree (off: gradient
/// accumulation micro-steps keep the unsharded gradients; the next synced backward reduces them).
/// `module` may be a module, a ModuleHolder or a pointer to one.
template <typename M>
void set_requires_gradient_sync(const M& module, bool sync) {
  for (const auto& hook : detail::hooks_in_subtree<FsdpHook>(detail::module_ref(module)))
    hook->set_requires_gradient_sync(sync);
}

/// Sets FsdpHook::set_reshard_after_backward on every unit in `module`'s subtree (off: the
/// micro-batches of a pipeline step share one all-gather; see titan/pipeline.hpp).
template <typename M>
void set_reshard_after_backward(const M& module, bool reshard) {
  for (const auto& hook : detail::hooks_in_subtree<FsdpHook>(detail::module_ref(module)))
    hook->set_reshard_after_backward(reshard);
}

/// Frees the unsharded parameters of every unit in `module`'s subtree (a module, a ModuleHolder
/// or a pointer to one).
template <typename M>
void reshard(const M& module) {
  for (const auto& hook : detail::hooks_in_subtree<FsdpHook>(detail::module_ref(module))) hook->reshard();
}

/// Checks that `optimizer` updates `model`'s parameters as fully_shard left them (`model`: a
/// module, a ModuleHolder or a pointer to one). An optimizer built before fully_shard holds the
/// unsharded tensors fully_shard took out of the parameter dictionary: their gradients are freed
/// after each reduction, so it would never change the model. The error names the parameter.
template <typename M>
void verify_optimizer(const torch::optim::Optimizer& optimizer, const M& model) {
  const torch::nn::Module& root = detail::module_ref(model);
  std::unordered_map<const c10::TensorImpl*, std::string> unsharded;  // -> the parameter's name
  detail::visit_modules(root, "", [&unsharded](const std::string& path, const torch::nn::Module& m) {
    if (auto unit = find_hook<FsdpHook>(m))
      for (const auto& p : unit->params())
        unsharded.emplace(p.unsharded.unsafeGetTensorImpl(), (path.empty() ? "" : path + ".") + p.names.front());
  });
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& param : group.params()) {
      auto it = unsharded.find(param.unsafeGetTensorImpl());
      TORCH_CHECK(it == unsharded.end(), "titan::verify_optimizer: the optimizer holds parameter '", it->second,
                  "' of '", root.name(), "' as it was before fully_shard (the unsharded tensor, whose gradient FSDP ",
                  "frees after reducing it), so it would never update the model: build the optimizer after ",
                  "fully_shard, from model->parameters()");
    }
  }
}

}  // namespace titan
