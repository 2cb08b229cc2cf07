#pragma once
// titan/ac.hpp: activation checkpointing (recomputation in backward) for modules called through
// titan::call.
//
//   titan::checkpoint_wrapper(*layer);                                       // full AC
//   titan::checkpoint_wrapper(*layer, titan::CheckpointWrapperOptions().policy(    // selective, per op
//       std::make_shared<titan::OpSavePolicy>()));
//   titan::apply_activation_checkpointing(*model->layers,                    // every 2nd layer
//       titan::ActivationCheckpointOptions().mode(titan::AcMode::EveryKthLayer).every_k(2));
//
// A checkpointed module's forward runs under no-grad, so none of its activations are kept; a
// closure node on its output recomputes the forward in backward (same RNG and autocast state, grad
// enabled, on detached inputs) and backpropagates through the recomputed graph. Parameters and any
// other tensor the forward closes over receive their gradients from that inner backward.
//
// Selective per-operator checkpointing additionally keeps the outputs of expensive operators
// (matrix products, fused attention) from the first forward and hands them back when the
// recomputation calls the same operator again, so only the cheap operators are recomputed. It
// intercepts operators in LibTorch's dispatcher below autograd: see docs/activation_checkpointing.md
// for the mechanism, its one process-wide registration, and the alternatives.

#include <titan/detail/autograd.hpp>
#include <titan/detail/torch_internals.hpp>
#include <titan/hooks.hpp>

#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/library.h>
#include <torch/nn/modules/container/modulelist.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace titan {

/// Which operators' outputs selective per-operator checkpointing keeps from the first forward
/// instead of recomputing. Names are as in operator schemas: "aten::mm" means every functional
/// overload of aten::mm (not aten::mm.out), "aten::max.dim" means that overload only and
/// "aten::max.default" the overload without a name (PyTorch's aten.max.default). Operators
/// that LibTorch decomposes above autograd (CompositeImplicitAutograd, e.g. aten::linear and
/// aten::matmul, which become aten::addmm / aten::mm / aten::bmm) never reach the policy and are
/// rejected, as are unknown names and operators that mutate or alias their inputs. Operators in
/// `every_other` are saved at their 1st, 3rd, 5th... call in a checkpointed region and recomputed
/// at the others (torchtitan keeps every other aten::mm: half the matmul outputs for half the
/// recomputation).
class OpSavePolicy {
 public:
  /// torchtitan's list: matrix products, fused attention kernels (CPU and CUDA variants) and the
  /// absolute maxima float8 scales come from (a scalar per cast: torchtitan keeps aten.max; titan's
  /// float8 takes the inf norm on a GPU); no bmm (the math attention path writes into its output
  /// through an alias).
  static std::vector<std::string> default_ops() {
    return {"aten::mm",
            "aten::addmm",
            "aten::_scaled_mm",
            "aten::max.default",
            "aten::linalg_vector_norm",
            "aten::_scaled_dot_product_flash_attention",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_efficient_attention",
            "aten::_scaled_dot_product_cudnn_attention",
            "aten::_scaled_dot_product_fused_attention_overrideable"};
  }

  /// The operators saved at every other call by default: aten::mm, as torchtitan.
  static std::vector<std::string> default_every_other() { return {"aten::mm"}; }

  /// A policy saving the outputs of `ops` (checked against the operators registered now); those
  /// whose name (without overload) is in `every_other` only at every other call (a name not among
  /// `ops` has no effect).
  explicit OpSavePolicy(std::vector<std::string> ops = default_ops(),
                        std::vector<std::string> every_other = default_every_other())
      : ops_(std::move(ops)), every_other_(every_other.begin(), every_other.end()) {
    const auto all = c10::Dispatcher::singleton().getAllOpNames();
    for (const auto& entry : ops_) {
      const auto ns = entry.find("::");
      const auto dot = entry.find('.', ns == std::string::npos ? 0 : ns + 2);
      const std::string name = entry.substr(0, dot);
      std::string overload = dot == std::string::npos ? "" : entry.substr(dot + 1);
      if (overload == "default") overload = "";  // the overload without a name
      bool found = false, reaches = false;
      for (const auto& op_name : all) {
        if (op_name.name != name || (dot != std::string::npos && op_name.overload_name != overload)) continue;
        found = true;
        auto op = c10::Dispatcher::singleton().findSchema(op_name);
        if (!op || !functional(op->schema())) continue;
        reaches = reaches || !decomposed(*op);
      }
      TORCH_CHECK(found, "titan::OpSavePolicy: unknown operator '", entry,
                  "' (expected a registered operator name such as 'aten::mm' or 'aten::max.dim')");
      TORCH_CHECK(reaches, "titan::OpSavePolicy: operator '", entry,
                  "' cannot be saved: it mutates or aliases its inputs, or LibTorch decomposes it above autograd ",
                  "(CompositeImplicitAutograd) so it never reaches the policy; list the operators it calls instead ",
                  "(aten::linear and aten::matmul become aten::addmm, aten::mm and aten::bmm)");
      auto& overloads = by_name_[name];
      if (dot == std::string::npos) {
        overloads.clear();
        all_overloads_.insert(name);
      } else if (!all_overloads_.count(name)) {
        overloads.insert(overload);
      }
    }
  }

  /// The operator names this policy was built from.
  const std::vector<std::string>& ops() const { return ops_; }

  /// Whether `op` is saved at every other call only.
  bool alternates(const c10::OperatorHandle& op) const { return every_other_.count(op.operator_name().name) > 0; }

  /// Whether the outputs of `op` are kept.
  bool saves(const c10::OperatorHandle& op) const {
    const auto& name = op.operator_name();
    auto it = by_name_.find(name.name);
    if (it == by_name_.end()) return false;
    if (!all_overloads_.count(name.name) && !it->second.count(name.overload_name)) return false;  // other overload
    return functional(op.schema());
  }

 private:
  /// Whether autograd runs `op`'s CompositeImplicitAutograd kernel (LibTorch's choice when the
  /// operator has no backend or CompositeExplicitAutograd kernel): its parts are dispatched instead.
  static bool decomposed(const c10::OperatorHandle& op) {
    using K = c10::DispatchKey;
    if (!op.hasKernelForDispatchKey(K::CompositeImplicitAutograd)) return false;
    if (op.hasKernelForDispatchKey(K::CompositeExplicitAutograd) ||
        op.hasKernelForDispatchKey(K::CompositeExplicitAutogradNonFunctional))
      return false;
    return !op.hasKernelForAnyDispatchKey(c10::DispatchKeySet({K::CPU, K::CUDA, K::HIP, K::XPU, K::MPS, K::PrivateUse1}));
  }

  static bool functional(const c10::FunctionSchema& schema) {
    if (schema.is_mutable()) return false;
    for (const auto& ret : schema.returns())
      if (ret.alias_info() != nullptr) return false;
    return true;
  }

  std::vector<std::string> ops_;
  std::unordered_set<std::string> every_other_;
  std::unordered_map<std::string, std::unordered_set<std::string>> by_name_;  // name -> exact overloads
  std::unordered_set<std::string> all_overloads_;                              // names listed without overload
};

/// How checkpoint_wrapper recomputes a module.
struct CheckpointWrapperOptions {
  /// Restore the CPU and accelerator random generators for the recomputation (dropout and other
  /// random operators then recompute identically), and restore the current state afterwards.
  TORCH_ARG(bool, preserve_rng_state) = true;
  /// Selective per-operator checkpointing: the outputs of the operators this policy names are
  /// kept from the first forward. nullptr: full checkpointing (only the inputs are kept).
  TORCH_ARG(std::shared_ptr<const OpSavePolicy>, policy) = nullptr;
};

namespace detail {

/// Snapshot of the default random generators: CPU and the accelerators holding `tensors`.
class RngState {
 public:
  static RngState capture(const TensorList& tensors) {
    RngState state;
    state.add(at::Device(at::kCPU));
    for (const auto& t : tensors)
      if (t.defined() && at::isAccelerator(t.device().type())) state.add(t.device());
    return state;
  }

  /// Sets every generator back to the snapshot.
  void restore() const {
    for (const auto& [generator, snapshot] : states_) {
      at::Generator gen = generator;
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(snapshot);
    }
  }

  /// The current state of the same generators.
  RngState now() const {
    RngState state;
    for (const auto& entry : states_) state.add_generator(entry.first);
    return state;
  }

 private:
  void add(at::Device device) {
    at::Generator gen = at::globalContext().defaultGenerator(device);
    for (const auto& entry : states_)
      if (entry.first == gen) return;
    add_generator(gen);
  }
  void add_generator(at::Generator gen) {
    std::lock_guard<std::mutex> lock(gen.mutex());
    states_.emplace_back(gen, gen.get_state());
  }

  std::vector<std::pair<at::Generator, at::Tensor>> states_;
};

/// Autocast settings (enabled, dtype) for CPU and CUDA, captured in forward and reapplied for the
/// recomputation (backward runs with the autocast state of the thread calling backward).
class AutocastState {
 public:
  static AutocastState current() {
    AutocastState state;
    for (auto type : {at::kCPU, at::kCUDA})
      state.entries_.push_back({type, at::autocast::is_autocast_enabled(type), at::autocast::get_autocast_dtype(type)});
    return state;
  }
  void apply() const {
    for (const auto& e : entries_) {
      at::autocast::set_autocast_enabled(e.type, e.enabled);
      at::autocast::set_autocast_dtype(e.type, e.dtype);
    }
  }

 private:
  struct Entry {
    at::DeviceType type;
    bool enabled;
    at::ScalarType dtype;
  };
  std::vector<Entry> entries_;
};

/// For a recomputation: applies forward's RNG (when given) and autocast state, counts in
/// recomputation_depth, and gives the caller's back on destruction (like torch.random.fork_rng:
/// the caller's random stream continues as if the recomputation had drawn nothing).
class RecomputeEnvironment {
 public:
  RecomputeEnvironment(const std::optional<RngState>& rng, const AutocastState& autocast)
      : caller_autocast_(AutocastState::current()) {
    if (rng) {
      caller_rng_ = rng->now();
      rng->restore();
    }
    autocast.apply();
    ++recomputation_depth();
  }
  ~RecomputeEnvironment() {
    --recomputation_depth();
    caller_autocast_.apply();
    if (caller_rng_) caller_rng_->restore();
  }
  RecomputeEnvironment(const RecomputeEnvironment&) = delete;
  RecomputeEnvironment& operator=(const RecomputeEnvironment&) = delete;

 private:
  AutocastState caller_autocast_;
  std::optional<RngState> caller_rng_;
};

/// Outputs of policy operators, kept from a checkpointed region's first forward for its
/// recomputation. One per checkpointed call.
class OpCache {
 public:
  explicit OpCache(std::shared_ptr<const OpSavePolicy> policy) : policy_(std::move(policy)) {}

  const OpSavePolicy& policy() const { return *policy_; }
  /// False while recording the first forward, true while the recomputation replays it.
  bool replaying = false;

  struct Entry {
    std::vector<std::vector<int64_t>> input_sizes;  // of the tensor arguments: checks the replay matches
    std::vector<c10::IValue> other_args;             // the non-tensor arguments (flags, scales): likewise
    std::vector<c10::IValue> outputs;                // the operator's results themselves (no copy)
    std::optional<RngState> rng_after;               // for random operators
  };

  /// Numbers the calls of policy operators, per operator, from 0 in each pass (recording or
  /// replaying): the k-th call of an operator in the recomputation is the k-th of the forward.
  int64_t next_call(const c10::OperatorName& op) { return calls_[op]++; }
  void start_pass(bool replay) {
    replaying = replay;
    calls_.clear();
  }

  void record(const c10::OperatorName& op, int64_t call, Entry entry) {
    for_each_tensor(entry.outputs, [this](at::Tensor& t) { saved_storages_.insert(storage_of(t)); });
    entries_[op][call] = std::move(entry);
  }

  /// Called before `written` is modified in place, or when it leaves the region: a saved output
  /// sharing its storage is replaced by a private copy first. Saved outputs are aliases, and an
  /// alias need not share their version counter (`add_` into `_unsafe_view(mm(...))`, as
  /// matmul + bias does), so versions alone would not see the write.
  void protect(const at::Tensor& written) {
    if (saved_storages_.empty() || !written.defined() || !written.has_storage()) return;
    if (saved_storages_.erase(storage_of(written)) == 0) return;
    for (auto& [op, calls] : entries_)
      for (auto& [call, entry] : calls)
        for_each_tensor(entry.outputs, [&](at::Tensor& t) {
          if (storage_of(t) == storage_of(written)) t = t.clone();
        });
  }

  /// The entry recorded for the `call`-th call of `op`, if any and its input shapes and non-tensor
  /// arguments match (otherwise the recomputation took another path and the operator is simply
  /// recomputed).
  std::optional<Entry> take(const c10::OperatorName& op, int64_t call, const std::vector<std::vector<int64_t>>& input_sizes,
                            const std::vector<c10::IValue>& other_args) {
    auto it = entries_.find(op);
    if (it == entries_.end()) return std::nullopt;
    auto found = it->second.find(call);
    if (found == it->second.end()) return std::nullopt;
    Entry entry = std::move(found->second);
    it->second.erase(found);
    if (entry.input_sizes != input_sizes || entry.other_args.size() != other_args.size()) return std::nullopt;
    for (size_t i = 0; i < other_args.size(); ++i)
      if (!(entry.other_args[i] == other_args[i])) return std::nullopt;
    return entry;
  }

 private:
  std::shared_ptr<const OpSavePolicy> policy_;
  std::unordered_map<c10::OperatorName, std::unordered_map<int64_t, Entry>> entries_;  // op -> call -> entry
  std::unordered_map<c10::OperatorName, int64_t> calls_;
  std::unordered_set<const c10::StorageImpl*> saved_storages_;  // of the outputs not yet copied

  static const c10::StorageImpl* storage_of(const at::Tensor& t) {
    return t.defined() && t.has_storage() ? t.storage().unsafeGetStorageImpl() : nullptr;
  }
  template <typename Fn>
  static void for_each_tensor(std::vector<c10::IValue>& values, Fn&& fn) {
    for (auto& value : values) {
      if (value.isTensor()) {
        fn(value.toTensor());
      } else if (value.isTensorList()) {
        auto list = value.toTensorList();
        for (size_t i = 0; i < list.size(); ++i) {
          at::Tensor t = list[i];
          fn(t);
          list[i] = t;
        }
      }
    }
  }
};

/// The OpCache of the checkpointed region running on this thread, or nullptr. Thread-local state
/// is how a dispatcher fallback finds its context (PyTorch's own dispatch modes do the same).
inline OpCache*& active_op_cache() {
  thread_local OpCache* cache = nullptr;
  return cache;
}

inline std::vector<std::vector<int64_t>> tensor_sizes(const torch::jit::Stack& stack, size_t first) {
  std::vector<std::vector<int64_t>> sizes;
  for (size_t i = first; i < stack.size(); ++i)
    if (stack[i].isTensor() && stack[i].toTensor().defined()) sizes.push_back(stack[i].toTensor().sizes().vec());
  return sizes;
}

/// The arguments from `first` on that hold no tensor (flags, scales, sizes), for matching a replay.
inline std::vector<c10::IValue> non_tensor_args(const torch::jit::Stack& stack, size_t first) {
  std::vector<c10::IValue> args;
  for (size_t i = first; i < stack.size(); ++i)
    if (!stack[i].isTensor() && !stack[i].isTensorList() && !stack[i].isOptionalTensorList()) args.push_back(stack[i]);
  return args;
}

/// The boxed fallback on kOpCacheKey: records or replays policy operators, redispatches the rest.
inline void op_cache_fallback(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  // Kernels below run without the key, so the operators they call are not seen again.
  c10::impl::ExcludeDispatchKeyGuard exclude(kOpCacheKey);
  const auto below = keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kOpCacheKey);
  OpCache* cache = active_op_cache();
  const auto& schema = op.schema();
  const size_t num_args = schema.arguments().size(), num_returns = schema.returns().size();
  if (cache != nullptr && !cache->replaying && schema.is_mutable()) {  // copy saved outputs it writes to
    for (size_t i = 0; i < num_args; ++i) {
      const auto* alias = schema.arguments()[i].alias_info();
      if (alias == nullptr || !alias->isWrite()) continue;
      const auto& value = (*stack)[stack->size() - num_args + i];
      if (value.isTensor()) cache->protect(value.toTensor());
      if (value.isTensorList())
        for (const at::Tensor& t : value.toTensorVector()) cache->protect(t);
    }
  }
  if (cache == nullptr || !cache->policy().saves(op)) {
    op.redispatchBoxed(below, stack);
    return;
  }
  const size_t first_arg = stack->size() - num_args;
  if (!cache->replaying) {
    // The first forward runs under no-grad, where the fused attention kernels skip the log-sum-exp
    // that their backward needs (SDPA derives compute_log_sumexp from grad mode). The saved outputs
    // feed the recomputation's backward, so record them as the grad-mode call computes them.
    for (size_t i = 0; i < num_args; ++i)
      if (schema.arguments()[i].name() == "compute_log_sumexp") (*stack)[first_arg + i] = true;
  }
  auto sizes = tensor_sizes(*stack, first_arg);
  auto other_args = non_tensor_args(*stack, first_arg);
  const int64_t call = cache->next_call(op.operator_name());
  if (cache->replaying) {
    if (auto entry = cache->take(op.operator_name(), call, sizes, other_args)) {
      torch::jit::drop(*stack, num_args);
      for (auto& value : entry->outputs) stack->push_back(std::move(value));
      if (entry->rng_after) entry->rng_after->restore();
      return;
    }
    op.redispatchBoxed(below, stack);
    return;
  }
  if (cache->policy().alternates(op) && call % 2 == 1) {  // recomputed: every other call is
    op.redispatchBoxed(below, stack);
    return;
  }
  const bool random = op.hasTag(at::Tag::nondeterministic_seeded);
  TensorList arg_tensors;  // for a random operator: which generators it may have advanced
  for (size_t i = stack->size() - num_args; random && i < stack->size(); ++i)
    if ((*stack)[i].isTensor()) arg_tensors.push_back((*stack)[i].toTensor());
  op.redispatchBoxed(below, stack);
  OpCache::Entry entry;
  entry.input_sizes = std::move(sizes);
  entry.other_args = std::move(other_args);
  // The results themselves (aliases, no copy); OpCache::protect copies one before anything writes to it.
  for (size_t i = stack->size() - num_returns; i < stack->size(); ++i) entry.outputs.push_back((*stack)[i]);
  if (random) entry.rng_after = RngState::capture(arg_tensors);
  cache->record(op.operator_name(), call, std::move(entry));
}

/// Registers op_cache_fallback once per process, on first use of selective per-operator
/// checkpointing. The registration is a function-local static (the one process-wide object this
/// header creates); nothing is registered at static-initialisation time.
inline void ensure_op_cache_fallback() {
  static const std::unique_ptr<torch::Library> registration = [] {
    TORCH_CHECK(!c10::Dispatcher::singleton().hasBackendFallbackForDispatchKey(kOpCacheKey),
                "titan: selective per-operator activation checkpointing needs the dispatch key ",
                c10::toString(kOpCacheKey), ", which another library (or a second copy of titan linked with hidden ",
                "symbols) already uses; use full or per-layer checkpointing instead");
    auto library =
        std::make_unique<torch::Library>(torch::Library::IMPL, "_", kOpCacheKey, "titan/ac.hpp", __LINE__);
    library->fallback(torch::CppFunction::makeFromBoxedFunction<&op_cache_fallback>());
    return library;
  }();
  (void)registration;
}

/// Enables the interception for `cache` on this thread for the guard's lifetime (no-op for null).
class OpCacheScope {
 public:
  OpCacheScope(OpCache* cache, bool replaying) : previous_(active_op_cache()) {
    if (cache == nullptr) return;
    cache->start_pass(replaying);
    include_.emplace(kOpCacheKey);
    active_op_cache() = cache;
  }
  ~OpCacheScope() { active_op_cache() = previous_; }
  OpCacheScope(const OpCacheScope&) = delete;
  OpCacheScope& operator=(const OpCacheScope&) = delete;

 private:
  OpCache* previous_;
  std::optional<c10::impl::IncludeDispatchKeyGuard> include_;
};

}  // namespace detail

/// The hook checkpoint_wrapper attaches: runs the rest of the call (inner hooks and forward)
/// without keeping activations and recomputes it in backward.
class CheckpointHook : public ModuleHook {
 public:
  explicit CheckpointHook(CheckpointWrapperOptions options) : options_(std::move(options)) {
    if (options_.policy()) detail::ensure_op_cache_fallback();
  }
  std::string name() const override { return "checkpoint_wrapper"; }
  HookKind kind() const override { return HookKind::ActivationCheckpoint; }
  const CheckpointWrapperOptions& options() const { return options_; }

  at::Tensor forward(torch::nn::Module& module, const TensorList& inputs, const ForwardFn& next) override {
    // Nothing to save (no-grad, or inside an enclosing checkpointed region's forward or
    // per-operator recomputation, which already covers this module): run as is.
    if (!torch::autograd::GradMode::is_enabled() || detail::active_op_cache() != nullptr) return next(inputs);
    bool needs_grad = false;
    for (const auto& t : inputs) needs_grad = needs_grad || (t.defined() && t.requires_grad());
    for (const auto& p : module.parameters()) needs_grad = needs_grad || p.requires_grad();
    if (!needs_grad) return next(inputs);

    auto state = std::make_shared<Recompute>();
    state->inputs = inputs;
    for (const auto& t : inputs) state->versions.push_back(t.defined() ? t._version() : 0);
    state->next = next;
    state->module_name = module.name();
    if (options_.preserve_rng_state()) state->rng = detail::RngState::capture(inputs);
    state->autocast = detail::AutocastState::current();
    if (options_.policy()) state->cache = std::make_shared<detail::OpCache>(options_.policy());

    at::Tensor out;
    {
      torch::NoGradGuard no_grad;
      detail::OpCacheScope scope(state->cache.get(), /*replaying=*/false);
      out = next(inputs);
    }
    if (state->cache) state->cache->protect(out);  // the caller may write into the output in place
    if (!out.defined() || !(out.is_floating_point() || out.is_complex())) return out;
    out = out.detach();  // the output may alias an input: give the node a handle of its own
    std::shared_ptr<detail::ClosureNode> node(
        new detail::ClosureNode("titan::CheckpointBackward",
                                [state](torch::autograd::variable_list&& grads) { return state->backward(grads); }),
        torch::autograd::deleteNode);
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    torch::autograd::set_history(out, node);
    return out;
  }

 private:
  /// What backward needs to run the forward again.
  struct Recompute {
    TensorList inputs;
    std::vector<int64_t> versions;
    ForwardFn next;
    std::string module_name;
    std::optional<detail::RngState> rng;
    detail::AutocastState autocast;
    std::shared_ptr<detail::OpCache> cache;

    torch::autograd::variable_list backward(const torch::autograd::variable_list& grads) {
      torch::autograd::variable_list input_grads(inputs.size());
      if (grads.empty() || !grads[0].defined()) return input_grads;
      TensorList detached;
      for (size_t i = 0; i < inputs.size(); ++i) {
        const auto& t = inputs[i];
        TORCH_CHECK(!t.defined() || t._version() == versions[i], "titan::checkpoint_wrapper: input ", i, " of '",
                    module_name, "' was modified in place during or after its checkpointed forward; the ",
                    "recomputation would differ (clone it before modifying it)");
        detached.push_back(t.defined() ? t.detach().requires_grad_(t.requires_grad()) : t);
      }
      at::Tensor recomputed;
      {
        detail::RecomputeEnvironment environment(rng, autocast);
        torch::AutoGradMode enable_grad(true);
        detail::OpCacheScope scope(cache.get(), /*replaying=*/true);
        recomputed = next(detached);
      }
      cache.reset();  // outputs not replayed (if any) are not needed any more
      if (recomputed.requires_grad()) torch::autograd::backward({recomputed}, {grads[0]});
      for (size_t i = 0; i < detached.size(); ++i)
        if (detached[i].defined() && detached[i].requires_grad()) input_grads[i] = detached[i].grad();
      return input_grads;
    }
  };

  CheckpointWrapperOptions options_;
};

/// Checkpoints `module` (a module, ModuleHolder, shared_ptr or pointer; see the top of this
/// header). Attach it after parallelize_module and before fully_shard (so FSDP's hook is outside
/// and the recomputation runs while the parameters are unsharded). Returns the hook.
template <typename M>
std::shared_ptr<CheckpointHook> checkpoint_wrapper(M&& module, CheckpointWrapperOptions options = {}) {
  auto& impl = detail::module_ref(module);
  TORCH_CHECK(!find_hook<CheckpointHook>(impl), "titan::checkpoint_wrapper: module '", impl.name(),
              "' is already checkpointed");
  detail::check_hook_order(impl, HookKind::ActivationCheckpoint, "titan::checkpoint_wrapper");
  auto hook = std::make_shared<CheckpointHook>(std::move(options));
  attach_hook(impl, hook);
  return hook;
}

/// Which layers apply_activation_checkpointing wraps (torchtitan's [activation_checkpoint] mode
/// and selective_ac_option).
enum class AcMode {
  None,           ///< no checkpointing ("none")
  Full,           ///< every layer, keeping only its inputs ("full")
  EveryKthLayer,  ///< full checkpointing of every k-th layer: the k-th, 2k-th, ... ("selective", k)
  PerOperator,    ///< every layer, keeping the outputs of save_ops ("selective", "op")
};

/// Activation checkpointing of a stack of layers, with chained setters.
struct ActivationCheckpointOptions {
  /// Which layers are wrapped, and how.
  TORCH_ARG(AcMode, mode) = AcMode::Full;
  /// For EveryKthLayer: k >= 1.
  TORCH_ARG(int64_t, every_k) = 2;
  /// For PerOperator: the operators whose outputs are kept (see OpSavePolicy).
  TORCH_ARG(std::vector<std::string>, save_ops) = OpSavePolicy::default_ops();
  /// For PerOperator: those of save_ops kept only at every other call (see OpSavePolicy).
  TORCH_ARG(std::vector<std::string>, every_other_ops) = OpSavePolicy::default_every_other();
  /// See CheckpointWrapperOptions::preserve_rng_state.
  TORCH_ARG(bool, preserve_rng_state) = true;
};

/// Applies `options` to `layers` (called through titan::call by their parent). Returns how many
/// layers were checkpointed.
inline size_t apply_activation_checkpointing(const std::vector<std::shared_ptr<torch::nn::Module>>& layers,
                                             const ActivationCheckpointOptions& options) {
  if (options.mode() == AcMode::None) return 0;
  CheckpointWrapperOptions base = CheckpointWrapperOptions().preserve_rng_state(options.preserve_rng_state());
  int64_t every = 1;
  if (options.mode() == AcMode::PerOperator)
    base.policy(std::make_shared<OpSavePolicy>(options.save_ops(), options.every_other_ops()));
  if (options.mode() == AcMode::EveryKthLayer) {
    every = options.every_k();
    TORCH_CHECK(every >= 1, "titan::apply_activation_checkpointing: every_k must be >= 1 (checkpoint every k-th ",
                "layer), got ", every);
  }
  size_t wrapped = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    if ((static_cast<int64_t>(i) + 1) % every != 0) continue;
    checkpoint_wrapper(*layers[i], base);
    ++wrapped;
  }
  return wrapped;
}

/// apply_activation_checkpointing for the children of a ModuleList.
inline size_t apply_activation_checkpointing(torch::nn::ModuleList& layers,
                                             const ActivationCheckpointOptions& options) {
  return apply_activation_checkpointing(layers->children(), options);
}

}  // namespace titan
