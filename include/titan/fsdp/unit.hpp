#pragma once
// titan/fsdp/unit.hpp: the fully_shard unit (FSDP2's parameter group and state): FsdpHook's
// unshard / reshard state machine around forward and backward, prefetching, and root setup.

#include <titan/collectives.hpp>
#include <titan/detail/autograd.hpp>
#include <titan/detail/torch_internals.hpp>
#include <titan/fsdp/collectives.hpp>
#include <titan/fsdp/options.hpp>
#include <titan/fsdp/param.hpp>
#include <titan/hooks.hpp>
#include <titan/sharding.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/nn/module.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace titan {

/// Counters of what a unit did, for diagnostics and tests.
struct FsdpStats {
  int64_t all_gathers = 0;        ///< all-gathers issued (prefetched or not)
  int64_t prefetches = 0;         ///< of which started ahead of use (forward or backward prefetch)
  int64_t reduce_scatters = 0;    ///< gradient reductions issued
  int64_t all_gather_bytes = 0;   ///< bytes this rank contributed to its all-gathers (its shards as sent)
  int64_t copies_reused = 0;      ///< unshards that used the compute copy as the optimizer left it (keep_compute_copy)
};

/// A parameter of a unit that keeps its compute copy (FsdpOptions::keep_compute_copy): what the
/// optimizer updates and the copy it writes in the same step (titan::adamw_copy_).
struct FsdpComputeCopy {
  at::Tensor shard;  ///< the parameter as the optimizer holds it (fp32), [shape]
  at::Tensor copy;   ///< the unsharded compute-dtype parameter the next forward reads (bf16), [shape]
};

class FsdpHook;

namespace detail {

/// The hooks of type H in `module`'s subtree, itself included, in pre-order.
template <typename H>
std::vector<std::shared_ptr<H>> hooks_in_subtree(const torch::nn::Module& module) {
  std::vector<std::shared_ptr<H>> found;
  visit_modules(module, "", [&found](const std::string&, const torch::nn::Module& m) {
    if (auto hook = find_hook<H>(m)) found.push_back(hook);
  });
  return found;
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
  using Param = FsdpParam;

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

  std::vector<int> gradient_reduction_ranks(const at::Tensor& param) const override {
    for (const auto& p : params_) {
      if (!p.sharded.is_same(param) && !p.unsharded.is_same(param)) continue;
      auto ranks = shard_group_->global_ranks();
      if (replicate_group_)
        ranks.insert(ranks.end(), replicate_group_->global_ranks().begin(), replicate_group_->global_ranks().end());
      return ranks;
    }
    return {};
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
  /// Records the nearest unit whose module holds this one's (fully_shard sets it), with this
  /// module's name relative to it: a unit inside another runs only inside that one's forward.
  void set_enclosing(const std::shared_ptr<FsdpHook>& unit, std::string name) {
    if (enclosing_.lock()) return;
    enclosing_ = unit;
    name_in_enclosing_ = std::move(name);
  }
  /// When false, backward accumulates the unsharded gradients locally and skips the reduction
  /// (gradient-accumulation micro-steps); the next backward with true reduces the sum.
  void set_requires_gradient_sync(bool sync) { requires_gradient_sync_ = sync; }
  bool requires_gradient_sync() const { return requires_gradient_sync_; }
  /// When false, the unsharded parameters stay gathered after backward and across the root's next
  /// forwards (micro-batches of one step: one all-gather for all of them); the next backward with
  /// true frees them. The optimizer must not change the shards while it is false.
  void set_reshard_after_backward(bool reshard) { reshard_after_backward_ = reshard; }
  bool reshard_after_backward() const { return reshard_after_backward_; }

  /// Whether this unit keeps its compute copy between steps: FsdpOptions::keep_compute_copy on a
  /// shard group of one rank without replicas, every parameter cast to another dtype, none
  /// gathered in a custom form.
  bool keeps_compute_copy() const {
    if (!options_.keep_compute_copy() || shard_group_->size() != 1 || (replicate_group_ && replicate_group_->size() > 1))
      return false;
    for (const auto& p : params_)
      if (p.custom_gather || compute_dtype(p) == p.sharded.scalar_type()) return false;
    return true;
  }

  /// The trainable parameters with the compute copy an optimizer step may write along with them
  /// (then call compute_copies_written with the shards it wrote); empty unless
  /// keeps_compute_copy() and the copy is allocated (after the first forward). Each copy shares the
  /// unit's storage, not its version counter.
  std::vector<FsdpComputeCopy> compute_copies() const {
    std::vector<FsdpComputeCopy> copies;
    if (!keeps_compute_copy() || !copy_allocated()) return copies;
    for (const auto& p : params_)
      if (p.sharded.requires_grad()) copies.push_back({p.sharded, detail::storage_alias(p.full())});
    return copies;
  }

  /// Declares the copies of `shards` (parameters of compute_copies()) written from the shards'
  /// current values: the next unshard uses the unit's copies instead of casting its shards, unless
  /// one changes before then. The copies of shards not listed count as they were.
  void compute_copies_written(const std::vector<at::Tensor>& shards) {
    TORCH_CHECK(keeps_compute_copy() && copy_allocated(), "titan::fully_shard: compute_copies_written() on '",
                module_name_, "', which keeps no compute copy (see FsdpOptions::keep_compute_copy)");
    if (copy_versions_.size() != params_.size())  // never cast: the copies of unlisted shards are not current
      copy_versions_.assign(params_.size(), {-1, nullptr});
    for (const auto& shard : shards) {
      auto it = std::find_if(params_.begin(), params_.end(), [&](const Param& p) { return p.sharded.is_same(shard); });
      TORCH_CHECK(it != params_.end(), "titan::fully_shard: compute_copies_written() on '", module_name_,
                  "' was given a tensor that is none of its parameters (expected shards of compute_copies())");
      copy_versions_[static_cast<size_t>(it - params_.begin())] = {shard._version(),
                                                                   shard.storage().unsafeGetStorageImpl()};
    }
  }

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
    if (!aliases_shards() && !keeps_compute_copy())
      for (auto& bucket : buckets_)
        if (bucket.storage.defined()) detail::resize_storage_bytes(bucket.storage, 0);
    state_ = State::Resharded;
  }

  at::Tensor forward(torch::nn::Module& module, const TensorList& inputs, const ForwardFn& next) override {
    if (!context_) {
      if (auto outer = enclosing_.lock()) fail_outside_root(outer->module_name_, name_in_enclosing_);
      become_root(module);
    }
    const bool grad = torch::autograd::GradMode::is_enabled();
    if (is_root()) {
      root_pre_forward();
    } else if (auto* root = context_->units.front(); root->state_ == State::Resharded) {
      fail_outside_root(root->module_name_, module_name_);
    }
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
    detail::reduce_scatter_copy_out(params_, out, rank);
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

  using GatherBucket = detail::GatherBucket;

  /// Fresh storage of `bucket` (its dtype, on `device`) for `world` ranks, each member's
  /// `storage` a part of it, and each member's placeholder on `device`.
  void allocate(GatherBucket& bucket, const at::Device& device, int world) {
    copy_versions_.clear();  // a fresh storage holds no copy
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

  /// A unit ran while the root unit's parameters are not gathered: the root's module was called
  /// as ->forward(...), so its own parameters (embeddings, final norm, output) would read as the
  /// zero placeholders and the model would train at a constant loss.
  [[noreturn]] static void fail_outside_root(const std::string& root, const std::string& unit) {
    TORCH_CHECK(false, "titan::fully_shard: the unit of '", unit, "' ran outside the forward of the unit enclosing ",
                "it ('", root, "'): that module was called as module->forward(...), which skips its fully_shard ",
                "hook, so its own parameters are never gathered and would read as zeros. Call it as ",
                "titan::call(model, ...) (in a pipeline stage function too: titan::call(*module, input))");
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
    const auto sent = detail::shards_to_send(params_, shard_group_, module_name_);
    for (auto& bucket : buckets_) {
      if (bucket.members.empty()) continue;
      if (world == 1) {  // finish_all_gather copies (and casts) the shards: nothing to gather
        bucket.sent.clear();
        for (size_t i : bucket.members) bucket.sent.push_back(sent[i]);
        continue;
      }
      auto input = detail::all_gather_copy_in(bucket, params_, sent, first.options());  // [flat_numel]
      stats_.all_gather_bytes += static_cast<int64_t>(input.nbytes());
      detail::all_gather_async(bucket, input, world, *shard_group_);
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
    if (copy_current()) {  // the compute copy as the optimizer (or the last cast) left it: no cast
      for (auto& bucket : buckets_) bucket.sent.clear();
      for (auto& p : params_) detail::repoint_tensor(p.unsharded, p.full());
      ++stats_.copies_reused;
      return;
    }
    RECORD_USER_SCOPE("titan::fsdp::all_gather_copy_out");
    for (auto& bucket : buckets_) {
      if (bucket.members.empty()) continue;
      const auto& device = params_[bucket.members.front()].sharded.device();
      if (bucket.storage.device() != device) allocate(bucket, device, world);  // the model moved (meta -> device)
      detail::resize_storage_bytes(bucket.storage,
                                   static_cast<size_t>(bucket.storage.numel()) * bucket.storage.element_size());
      detail::all_gather_copy_out(bucket, params_, world);
    }
    for (auto& p : params_)
      if (p.custom_gather) p.custom_gather->post_all_gather(p.full());
    if (keeps_compute_copy()) {  // the copy holds the shards' values as of now
      copy_versions_.clear();
      for (const auto& p : params_)
        copy_versions_.push_back({p.sharded._version(), p.sharded.storage().unsafeGetStorageImpl()});
    }
  }

  /// Whether the unit's storage holds the compute copy at full size on the shards' device.
  bool copy_allocated() const {
    const auto& storage = buckets_.front().storage;
    if (!storage.defined() || storage.device() != params_.front().sharded.device()) return false;
    return storage.is_meta() || storage.storage().nbytes() >= static_cast<size_t>(storage.numel() * storage.element_size());
  }

  /// Whether the copy can be used as it is: kept, allocated, and no shard changed (in place or
  /// replaced) since its values were recorded.
  bool copy_current() const {
    if (!keeps_compute_copy() || copy_versions_.size() != params_.size() || !copy_allocated()) return false;
    for (size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i].sharded;
      const auto& [version, storage] = copy_versions_[i];
      if (version != p._version() || storage != p.storage().unsafeGetStorageImpl()) return false;
    }
    return true;
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
      detail::reduce_on_one_rank(params_, dtype, keeps_compute_copy());
      return;
    }
    auto input = detail::reduce_scatter_copy_in(params_, world, flat_numel_, first.sharded.options(),
                                                 dtype);  // [world * flat_numel]
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
  /// keep_compute_copy: each shard's version and storage when the copy was last written from it.
  std::vector<std::pair<int64_t, const c10::StorageImpl*>> copy_versions_;

  std::shared_ptr<detail::FsdpContext> context_;
  std::weak_ptr<FsdpHook> enclosing_;  ///< the nearest unit whose module holds this one's (set_enclosing)
  std::string name_in_enclosing_;      ///< this module's name relative to that unit's module
  State state_ = State::Resharded;
  bool needs_post_backward_ = false;
  bool requires_gradient_sync_ = true;
  bool reshard_after_backward_ = true;
  FsdpStats stats_;

  c10::intrusive_ptr<c10d::Work> reduce_work_;
  at::Tensor reduce_input_, reduce_output_;
};

}  // namespace titan
