#pragma once
// titan/hooks.hpp: how titan attaches to an unchanged LibTorch module.
//
// LibTorch modules have no forward hooks: `layer->forward(x)` and `layer(x)` call the user's
// forward directly. titan therefore asks one thing of model code: where a submodule that titan may
// wrap is called, write
//
//   h = titan::call(layer, h, freqs);      // instead of layer->forward(h, freqs)
//
// With nothing attached this is exactly `layer->forward(h, freqs)`. fully_shard, checkpoint_wrapper
// and parallelize_module attach a ModuleHook to the module (kept in a child module named
// "_titan_hooks", so the hooks live and die with the model: no global registry), and titan::call
// runs the hooks around forward. Hooks nest like decorators: the last one attached is outermost,
// so applying TP, then AC, then FSDP (torchtitan's order, HookKind) runs FSDP's all-gather first,
// then the checkpointed region, then TP's layouts around the user's forward. That order is the
// one composition rule (check_hook_order): attaching a hook where a hook of a later kind already
// is fails, naming both and the order.
//
// The contract is checked: when the outermost titan::call on a thread returns, every module below
// it that has hooks must have been called through titan::call during that call, else the error
// names the module and its hooks (a module called with ->forward would silently skip them).
// titan::verify_calls(model) checks the same after the fact and runs the hooks' model-wide checks.
//
// Tensor arguments are handed to hooks as a list (they may be replaced, e.g. redistributed by TP);
// other arguments are bound by value, so a hook may run the forward again later (activation
// checkpointing recomputes it during backward). forward returns an at::Tensor, or a std::tuple of
// them (a fused residual add and norm: the sum and the normalized sum); hooks run such a module
// through ModuleHook::forward_outputs, which position-wise hooks (SequenceParallel) implement and
// the others refuse with an error naming the hook.

#include <titan/detail/torch_internals.hpp>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeindex>
#include <utility>
#include <vector>

namespace titan {

/// Tensors in, tensors out.
using TensorList = std::vector<at::Tensor>;
/// Runs the rest of a module call (inner hooks and forward) on the given tensor inputs.
using ForwardFn = std::function<at::Tensor(const TensorList&)>;
/// The same for a module whose forward returns several tensors (a std::tuple), in order.
using OutputsForwardFn = std::function<TensorList(const TensorList&)>;

/// Which of titan's parallelisms a hook implements, in the order they must be applied (torchtitan's):
/// conversions of layers (float8) first (their hooks innermost), then tensor and expert
/// parallelism (both shard parameters), then activation checkpointing, then FSDP. attach_hook and
/// the APIs attaching hooks check this order (check_hook_order); Other is unordered.
enum class HookKind { Conversion = 0, TensorParallel = 1, ActivationCheckpoint = 2, FullyShard = 3, Other = 4 };

/// Behaviour attached to a module and run by titan::call around its forward.
class ModuleHook {
 public:
  virtual ~ModuleHook() = default;
  /// A short name for messages, e.g. "fully_shard" or "tensor-parallel rowwise".
  virtual std::string name() const = 0;
  /// Which parallelism this hook implements (for the order checks).
  virtual HookKind kind() const { return HookKind::Other; }
  /// Runs the module: typically prepares `inputs`, calls `next(inputs)`, post-processes the output.
  virtual at::Tensor forward(torch::nn::Module& module, const TensorList& inputs, const ForwardFn& next) = 0;
  /// Runs a module whose forward returns several tensors, as forward does for one. Hooks that act
  /// position-wise on every tensor alike override it; by default a hook refuses such a module.
  virtual TensorList forward_outputs(torch::nn::Module& module, const TensorList& inputs,
                                     const OutputsForwardFn& next) {
    TORCH_CHECK(false, "titan::call: '", name(), "' is attached to a module whose forward returns several tensors (",
                module.name(), "), which it does not support: it handles modules returning one at::Tensor");
  }
  /// Whether this hook may run once for several modules that read the same inputs and whose forwards
  /// titan::call_fused computes at once, in place of itself and `other` (the hook at the same
  /// position on another of those modules): it prepares the inputs as `other` does, and it returns
  /// what the forward returned, unchanged (call_fused checks that), and it keeps no `next` past the
  /// call. Tensor-parallel colwise with a local output does; by default a hook does not fuse.
  virtual bool fuses_with(const ModuleHook& /*other*/) const { return false; }
  /// A conversion hook (HookKind::Conversion: it replaces the module's forward) that fuses: the
  /// outputs of `modules` (each with a hook of this kind at the same position, fusing with this
  /// one) from their shared `inputs`, computed in place of call_fused's fused forward.
  virtual TensorList forward_fused(const std::vector<torch::nn::Module*>& modules, const TensorList& /*inputs*/) {
    TORCH_CHECK(false, "titan::call_fused: '", name(), "' replaces the forward of ", modules.size(), " fused ",
                "modules but cannot compute them at once; call the modules one by one with titan::call");
  }
  /// Checks a requirement this kind of hook has of the whole model `root` it is part of, throwing
  /// an error that names what is wrong (e.g. FSDP: every trainable parameter belongs to a unit).
  /// titan::verify_calls runs it once per hook type.
  virtual void verify_model(const torch::nn::Module& root) const {}
  /// The global ranks whose gradients of `param` are summed with this rank's when this hook
  /// manages `param` (FSDP: its shard group and, with HSDP, its replicate group; SequenceParallel:
  /// its tp group), else none: the typed query by which other hooks check that a gradient is
  /// reduced (context parallelism) or not reduced with the wrong ranks (expert parallelism).
  virtual std::vector<int> gradient_reduction_ranks(const at::Tensor& /*param*/) const { return {}; }
};

namespace detail {

/// The child module holding a module's hooks, innermost first, and how often they ran.
class HookSlotImpl : public torch::nn::Module {
 public:
  std::vector<std::shared_ptr<ModuleHook>> hooks;
  uint64_t calls = 0;  ///< titan::calls of the module since the hooks were attached
  uint64_t pass = 0;   ///< the outermost call (CallTracking::pass) it last ran in
  bool verified = false;  ///< its hooks' model-wide checks ran (after the first outermost call)
};

inline constexpr const char* kHookSlotName = "_titan_hooks";

/// `module`'s hook slot, or nullptr (a hash lookup among its children: no copy, no scan).
inline HookSlotImpl* hook_slot(const torch::nn::Module& module) {
  const auto* child = child_dict(module).find(kHookSlotName);
  return child ? dynamic_cast<HookSlotImpl*>(child->get()) : nullptr;
}

/// How deep this thread is inside titan::call, and a counter numbering its outermost calls. The
/// one piece of thread-local state of hooks.hpp: nesting is a property of the call stack, which is
/// per thread (a backward recomputation on the autograd engine's thread starts at depth 0).
struct CallTracking {
  int depth = 0;
  uint64_t pass = 0;
};

inline CallTracking& call_tracking() {
  thread_local CallTracking tracking;
  return tracking;
}

/// Counts one level of titan::call nesting for its lifetime.
class CallDepth {
 public:
  explicit CallDepth(CallTracking& tracking) : tracking_(tracking) { ++tracking_.depth; }
  ~CallDepth() { --tracking_.depth; }
  CallDepth(const CallDepth&) = delete;
  CallDepth& operator=(const CallDepth&) = delete;

 private:
  CallTracking& tracking_;
};

/// Calls `visit(path, module)` for `module` (a torch::nn::Module, const or not) and every
/// descendant, in pre-order, skipping hook slots. `path` is the dotted name relative to `module`
/// ("" for itself).
template <typename ModuleT, typename Visit>
void visit_modules(ModuleT& module, const std::string& path, const Visit& visit) {
  visit(path, module);
  for (const auto& child : child_dict(module)) {
    if (child.key() == kHookSlotName) continue;
    visit_modules(static_cast<ModuleT&>(*child.value()), path.empty() ? child.key() : path + "." + child.key(), visit);
  }
}

/// Whether any hooked module below (or at) `module` has `skipped(slot)` true; no allocation.
template <typename Skipped>
bool any_hooked(const torch::nn::Module& module, const Skipped& skipped) {
  if (const auto* slot = hook_slot(module); slot && !slot->hooks.empty() && skipped(*slot)) return true;
  for (const auto& child : child_dict(module))
    if (child.key() != kHookSlotName && any_hooked(*child.value(), skipped)) return true;
  return false;
}

/// "'wo' has tensor-parallel rowwise attached" for each hooked module below `root` with
/// `skipped(slot)` (the first three), and " but was" or " but were" to go on with.
template <typename Skipped>
std::string describe_hooked(const torch::nn::Module& root, const Skipped& skipped) {
  std::string text;
  int listed = 0, more = 0;
  visit_modules(root, "", [&](const std::string& path, const torch::nn::Module& module) {
    const auto* slot = hook_slot(module);
    if (!slot || slot->hooks.empty() || !skipped(*slot)) return;
    if (listed == 3) {
      ++more;
      return;
    }
    std::string names;
    for (auto hook = slot->hooks.rbegin(); hook != slot->hooks.rend(); ++hook)
      names += (names.empty() ? "" : ", ") + (*hook)->name();
    text += (listed++ ? "; " : "") + std::string("'") + (path.empty() ? "<root>" : path) + "' has " + names +
            " attached";
  });
  if (more > 0) text += c10::str(" (and ", more, " more)");
  return text + (listed + more > 1 ? " but were" : " but was");
}

/// One walk over the hook slots below (and at) `module` after outermost call `pass`: whether any
/// hooked module did not run in it, and the slots that ran for the first time (`fresh`).
inline bool walk_slots(const torch::nn::Module& module, uint64_t pass, std::vector<HookSlotImpl*>& fresh) {
  bool skipped = false;
  if (auto* slot = hook_slot(module); slot && !slot->hooks.empty()) {
    if (slot->pass != pass) {
      skipped = true;
    } else if (!slot->verified) {
      fresh.push_back(slot);
    }
  }
  for (const auto& child : child_dict(module))
    if (child.key() != kHookSlotName) skipped = walk_slots(*child.value(), pass, fresh) || skipped;
  return skipped;
}

/// After the outermost titan::call of `root` (numbered `pass`): every hooked module below it ran;
/// and the hooks that ran for the first time have their model-wide checks (ModuleHook::
/// verify_model, once per hook type) run against `root`, so that a model-wide mistake (FSDP: a
/// root left unsharded) fails at the first forward, not only when the user calls verify_calls.
inline void check_calls(const torch::nn::Module& root, uint64_t pass) {
  std::vector<HookSlotImpl*> fresh;
  if (walk_slots(root, pass, fresh)) {
    auto skipped = [pass](const HookSlotImpl& slot) { return slot.pass != pass; };
    TORCH_CHECK(false, "titan::call: ", describe_hooked(root, skipped), " not called through titan::call ",
                "during the forward of '", root.name(), "' (names relative to it). A module called as ",
                "module->forward(...) skips its hooks and computes wrong values or reads freed parameters: call it ",
                "as titan::call(module, ...) in its parent's forward (docs/design.md, section 3)");
  }
  if (fresh.empty()) return;
  std::set<std::type_index> verified;
  for (auto* slot : fresh) {
    slot->verified = true;
    for (const auto& hook : slot->hooks)
      if (verified.insert(std::type_index(typeid(*hook))).second) hook->verify_model(root);
  }
}

/// The one composition rule: a hook of `kind` is attached to `root` (or below it) only while no
/// hook of a later kind (HookKind order: float8 conversion, tensor parallelism, activation
/// checkpointing, fully_shard) is attached there, so that each wraps the ones before it. `who`
/// names the API attaching it; the error names the hook already there and the order.
inline void check_hook_order(const torch::nn::Module& root, HookKind kind, const char* who) {
  if (kind == HookKind::Other) return;
  std::optional<std::pair<std::string, std::string>> later;  // its path and name
  visit_modules(root, "", [&](const std::string& path, const torch::nn::Module& module) {
    const auto* slot = hook_slot(module);
    for (size_t i = 0; slot && !later && i < slot->hooks.size(); ++i)
      if (slot->hooks[i]->kind() != HookKind::Other && slot->hooks[i]->kind() > kind)
        later = std::make_pair(path.empty() ? std::string("<root>") : path, slot->hooks[i]->name());
  });
  if (!later) return;
  static const char* const first[] = {"Convert to float8", "Apply tensor and expert parallelism",
                                      "Apply activation checkpointing", "Apply fully_shard"};
  TORCH_CHECK(false, who, ": '", later->first, "' already has ", later->second, " attached. ",
              first[static_cast<int>(kind)], " first: titan's parallelisms compose in one order, ",
              "convert_to_float8_training, then parallelize_module and apply_expert_parallel, then ",
              "checkpoint_wrapper, then fully_shard ",
              "(each hook wraps the ones applied before it: FSDP gathers what TP sharded, AC recomputes inside ",
              "FSDP's gather, float8 casts the local shard)");
}

/// Rethrows `error` (the exception being handled), raised inside the outermost titan::call of
/// `root` (numbered `pass`), keeping its type (c10::IndexError, c10::OutOfMemoryError, ...). An
/// error from ATen rather than from titan ("index out of range in self", a shape that does not
/// fit) is often a hooked module called as module->forward(...), which computes on its parameters
/// as sharded: the error then gains a context line naming the hooked modules below `root` that had
/// not run through titan::call when it was raised. Running out of memory is rethrown as it is.
[[noreturn]] inline void explain_error(const torch::nn::Module& root, uint64_t pass, c10::Error& error) {
  auto not_yet = [pass](const HookSlotImpl& slot) { return slot.pass != pass; };
  if (dynamic_cast<const c10::OutOfMemoryError*>(&error) || error.msg().rfind("titan", 0) == 0 ||
      !any_hooked(root, not_yet))
    throw;
  error.add_context(c10::str("titan::call: this error was raised inside the forward of '", root.name(), "', where ",
                             describe_hooked(root, not_yet), " not called through titan::call before it (names ",
                             "relative to it). A hooked module called as module->forward(...) computes on its ",
                             "parameters as sharded (a tensor-parallel shard, or an FSDP placeholder): call it as ",
                             "titan::call(module, ...)"));
  throw;
}

template <typename T>
decltype(auto) module_ref(T& module) {
  if constexpr (std::is_base_of_v<torch::nn::Module, std::remove_cv_t<T>>) {
    return (module);
  } else {
    return (*module);  // ModuleHolder, std::shared_ptr or raw pointer
  }
}

template <typename T>
void collect_tensor(const T& arg, TensorList& tensors) {
  if constexpr (std::is_same_v<std::decay_t<T>, at::Tensor>) tensors.push_back(arg);
}

template <typename T>
std::decay_t<T> replace_tensor(const T& arg, const TensorList& tensors, size_t& next) {
  if constexpr (std::is_same_v<std::decay_t<T>, at::Tensor>) {
    return tensors.at(next++);
  } else {
    return arg;
  }
}

template <typename Impl, typename Bound, size_t... I>
decltype(auto) call_bound(Impl& module, const Bound& bound, const TensorList& tensors, std::index_sequence<I...>) {
  size_t next = 0;
  // Braced initialisation evaluates left to right, so tensors are taken in argument order.
  Bound replaced{replace_tensor(std::get<I>(bound), tensors, next)...};
  TORCH_CHECK(next == tensors.size(), "titan::call: a hook passed ", tensors.size(), " tensors to a forward taking ",
              next);
  return std::apply([&module](auto&... args) { return module.forward(args...); }, replaced);
}

/// Whether T is a std::tuple of at::Tensor (a forward titan::call runs through forward_outputs).
template <typename T>
struct is_tensor_tuple : std::false_type {};
template <typename... T>
struct is_tensor_tuple<std::tuple<T...>>
    : std::bool_constant<(sizeof...(T) > 0 && (std::is_same_v<T, at::Tensor> && ...))> {};

/// A tuple of tensors as a list, and back (checking the count a hook returned).
template <typename... T>
TensorList tuple_to_list(const std::tuple<T...>& tuple) {
  return std::apply([](const auto&... t) { return TensorList{t...}; }, tuple);
}
template <typename Tuple, size_t... I>
Tuple list_to_tuple(const TensorList& list, std::index_sequence<I...>) {
  TORCH_CHECK(list.size() == sizeof...(I), "titan::call: a hook returned ", list.size(),
              " tensors for a forward returning ", sizeof...(I));
  return Tuple{list[I]...};
}

}  // namespace detail

/// Attaches `hook` to `module` (a module, ModuleHolder, shared_ptr or pointer), outside the hooks
/// already there.
template <typename M>
void attach_hook(M&& module_like, std::shared_ptr<ModuleHook> hook) {
  TORCH_CHECK(hook, "titan::attach_hook: null hook");
  torch::nn::Module& module = detail::module_ref(module_like);
  detail::check_hook_order(module, hook->kind(), "titan::attach_hook");
  auto* slot = detail::hook_slot(module);
  if (!slot) slot = module.register_module(detail::kHookSlotName, std::make_shared<detail::HookSlotImpl>()).get();
  slot->hooks.push_back(std::move(hook));
  slot->calls = 0;
  slot->verified = false;
}

/// The hooks attached to `module` (a module, ModuleHolder, shared_ptr or pointer), innermost first.
template <typename M>
std::vector<std::shared_ptr<ModuleHook>> hooks_of(const M& module_like) {
  const auto* slot = detail::hook_slot(detail::module_ref(module_like));
  return slot ? slot->hooks : std::vector<std::shared_ptr<ModuleHook>>{};
}

/// The innermost hook of type H attached to `module` (a module, ModuleHolder, shared_ptr or
/// pointer), or nullptr.
template <typename H, typename M>
std::shared_ptr<H> find_hook(const M& module_like) {
  if (const auto* slot = detail::hook_slot(detail::module_ref(module_like)))
    for (const auto& hook : slot->hooks)
      if (auto typed = std::dynamic_pointer_cast<H>(hook)) return typed;
  return nullptr;
}

/// Calls `module`'s forward with `args` through the hooks titan attached to it (see the top of
/// this header) and returns what it returns: an at::Tensor, or a std::tuple of them. `module` may
/// be a module, a ModuleHolder (e.g. torch::nn::Linear), a shared_ptr or a pointer to one. The
/// outermost call on a thread checks, when it returns, that every hooked module below it ran
/// through titan::call.
template <typename M, typename... Args>
auto call(M&& module, Args&&... args) {
  auto& impl = detail::module_ref(module);
  using Impl = std::remove_reference_t<decltype(impl)>;
  using Output = decltype(impl.forward(std::forward<Args>(args)...));
  constexpr bool single = std::is_same_v<Output, at::Tensor>;
  static_assert(single || detail::is_tensor_tuple<Output>::value,
                "titan::call supports modules whose forward returns an at::Tensor or a std::tuple of them");
  auto& tracking = detail::call_tracking();
  const bool outermost = tracking.depth == 0;
  if (outermost) ++tracking.pass;
  Output output;
  try {
    detail::CallDepth depth(tracking);
    auto* slot = detail::hook_slot(impl);
    if (!slot || slot->hooks.empty()) {
      output = impl.forward(std::forward<Args>(args)...);
    } else {
      ++slot->calls;
      slot->pass = tracking.pass;
      TensorList inputs;
      (detail::collect_tensor(args, inputs), ...);
      auto bound = std::make_shared<std::tuple<std::decay_t<Args>...>>(std::forward<Args>(args)...);
      Impl* self = &impl;
      auto hooks = slot->hooks;
      // Wrap from the innermost hook outwards; the outermost runs first.
      if constexpr (single) {
        ForwardFn run = [self, bound](const TensorList& tensors) {
          return detail::call_bound(*self, *bound, tensors, std::index_sequence_for<Args...>{});
        };
        for (const auto& hook : hooks) {
          run = [self, hook, inner = std::move(run)](const TensorList& tensors) {
            return hook->forward(*self, tensors, inner);
          };
        }
        output = run(inputs);
      } else {
        OutputsForwardFn run = [self, bound](const TensorList& tensors) {
          return detail::tuple_to_list(detail::call_bound(*self, *bound, tensors, std::index_sequence_for<Args...>{}));
        };
        for (const auto& hook : hooks) {
          run = [self, hook, inner = std::move(run)](const TensorList& tensors) {
            return hook->forward_outputs(*self, tensors, inner);
          };
        }
        output = detail::list_to_tuple<Output>(run(inputs), std::make_index_sequence<std::tuple_size_v<Output>>{});
      }
    }
  } catch (c10::Error& error) {
    if (!outermost) throw;
    detail::explain_error(impl, tracking.pass, error);
  }
  if (outermost) detail::check_calls(impl, tracking.pass);
  return output;
}

/// Calls `modules`, which read the same tensor `inputs`, as one computation: `fused_forward(inputs)`
/// returns each module's output, in order (linear layers sharing an input: titan::linear_fused,
/// one GEMM). Without hooks this is fused_forward(inputs). With hooks, every module must have as
/// many as the first and each must fuse with the first module's at its position
/// (ModuleHook::fuses_with, e.g. the tensor-parallel colwise projections q, k, v): the first
/// module's hooks then run once around fused_forward and every module counts as called
/// (titan::call's check). Otherwise the error names the module and the hook that does not fuse.
/// When the innermost hooks convert the modules (float8 linear layers), the first one's
/// ModuleHook::forward_fused computes the outputs instead of fused_forward.
inline TensorList call_fused(const std::vector<torch::nn::Module*>& modules, const TensorList& inputs,
                             const OutputsForwardFn& fused_forward) {
  TORCH_CHECK(!modules.empty(), "titan::call_fused: no modules given");
  auto& tracking = detail::call_tracking();
  const bool outermost = tracking.depth == 0;
  if (outermost) ++tracking.pass;
  TensorList outputs;
  {
    detail::CallDepth depth(tracking);
    auto* first = detail::hook_slot(*modules.front());
    const auto hooks = first ? first->hooks : std::vector<std::shared_ptr<ModuleHook>>{};
    for (size_t m = 1; m < modules.size(); ++m) {
      const auto* slot = detail::hook_slot(*modules[m]);
      const size_t count = slot ? slot->hooks.size() : 0;
      TORCH_CHECK(count == hooks.size(), "titan::call_fused: module ", m, " (", modules[m]->name(), ") has ", count,
                  " hooks attached but module 0 (", modules.front()->name(), ") has ", hooks.size(),
                  ": fused modules must be parallelized alike (or call them one by one with titan::call)");
      for (size_t h = 0; h < count; ++h)
        TORCH_CHECK(hooks[h]->fuses_with(*slot->hooks[h]), "titan::call_fused: '", hooks[h]->name(),
                    "' attached to module 0 (", modules.front()->name(), ") does not fuse with '",
                    slot->hooks[h]->name(), "' attached to module ", m, " (", modules[m]->name(),
                    "): only hooks that prepare the shared inputs alike and leave the outputs as computed fuse ",
                    "(e.g. ColwiseParallel with a Shard(-1) output); call the modules one by one with titan::call");
    }
    for (auto* module : modules) {
      if (auto* slot = detail::hook_slot(*module); slot && !slot->hooks.empty()) {
        ++slot->calls;
        slot->pass = tracking.pass;
      }
    }
    if (hooks.empty()) {
      outputs = fused_forward(inputs);
    } else {
      // The first module's hooks around the fused forward; each hands on the first output as it got it.
      torch::nn::Module* self = modules.front();
      const bool converted = hooks.front()->kind() == HookKind::Conversion;
      ForwardFn run = [&](const TensorList& tensors) {
        outputs = converted ? hooks.front()->forward_fused(modules, tensors) : fused_forward(tensors);
        TORCH_CHECK(outputs.size() == modules.size(), "titan::call_fused: the fused forward returned ",
                    outputs.size(), " tensors for ", modules.size(), " modules");
        return outputs.front();
      };
      for (size_t h = converted ? 1 : 0; h < hooks.size(); ++h) {
        run = [self, hook = hooks[h], &outputs, inner = std::move(run)](const TensorList& tensors) {
          auto out = hook->forward(*self, tensors, inner);
          TORCH_CHECK(out.is_same(outputs.front()), "titan::call_fused: '", hook->name(), "' attached to module 0 (",
                      self->name(), ") changed the fused forward's output, which its fuses_with promised not to do");
          return out;
        };
      }
      run(inputs);
    }
  }
  if (outermost)
    for (auto* module : modules) detail::check_calls(*module, tracking.pass);
  return outputs;
}

/// Checks that `model` (a module, ModuleHolder, shared_ptr or pointer) uses titan as intended,
/// typically once after the first training step: every module with hooks has been called through
/// titan::call since they were attached, provided any has (a root called as model->forward(...)
/// is caught here, not by titan::call), and each kind of hook's model-wide requirement holds (FSDP:
/// every trainable parameter belongs to a fully_shard unit). Errors name the modules.
template <typename M>
void verify_calls(const M& model) {
  const torch::nn::Module& root = detail::module_ref(model);
  const bool any_called = detail::any_hooked(root, [](const detail::HookSlotImpl& slot) { return slot.calls > 0; });
  auto never = [](const detail::HookSlotImpl& slot) { return slot.calls == 0; };
  TORCH_CHECK(!any_called || !detail::any_hooked(root, never), "titan::verify_calls: ", detail::describe_hooked(root, never),
              " never called through titan::call, while other hooked modules of '", root.name(),
              "' were (names relative to it): call it as titan::call(module, ...) instead of module->forward(...) ",
              "(docs/design.md, section 3)");
  std::set<std::type_index> verified;
  detail::visit_modules(root, "", [&](const std::string&, const torch::nn::Module& module) {
    if (const auto* slot = detail::hook_slot(module))
      for (const auto& hook : slot->hooks)
        if (verified.insert(std::type_index(typeid(*hook))).second) hook->verify_model(root);
  });
}

/// The global ranks over which the hooks of `root` and its submodules (but `except`) reduce
/// `param`'s gradient (ModuleHook::gradient_reduction_ranks: FSDP's shard and replicate groups, a
/// sequence-parallel sum, expert parallelism's all-to-all), sorted; empty when none does. Context
/// and expert parallelism check their gradients' reductions with it.
inline std::vector<int> gradient_reduction_ranks(const torch::nn::Module& root, const at::Tensor& param,
                                                 const ModuleHook* except = nullptr) {
  std::vector<int> ranks;
  detail::visit_modules(root, "", [&](const std::string&, const torch::nn::Module& module) {
    if (const auto* slot = detail::hook_slot(module))
      for (const auto& hook : slot->hooks) {
        if (hook.get() == except) continue;
        const auto more = hook->gradient_reduction_ranks(param);
        ranks.insert(ranks.end(), more.begin(), more.end());
      }
  });
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  return ranks;
}

namespace detail {

/// Whether one name component matches a glob component ('*' = any run of characters).
inline bool glob_component(const std::string& pattern, const std::string& text) {
  size_t p = 0, t = 0, star = std::string::npos, resume = 0;
  while (t < text.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      resume = t;
    } else if (p < pattern.size() && pattern[p] == text[t]) {
      ++p;
      ++t;
    } else if (star != std::string::npos) {
      p = star + 1;
      t = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

/// The components of a dotted name ("" has none).
inline std::vector<std::string> split_dots(const std::string& name) {
  std::vector<std::string> parts;
  if (name.empty()) return parts;
  size_t start = 0;
  while (true) {
    auto dot = name.find('.', start);
    parts.push_back(name.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return parts;
}

/// Whether dotted module `name` matches `pattern` component by component.
inline bool match_module_name(const std::string& pattern, const std::string& name) {
  auto p = split_dots(pattern), n = split_dots(name);
  if (p.size() != n.size()) return false;
  for (size_t i = 0; i < p.size(); ++i)
    if (!glob_component(p[i], n[i])) return false;
  return true;
}

/// Up to eight of `module`'s submodule names with as many components as `pattern` (else any), for
/// the error of a pattern that matches nothing.
inline std::string module_names_like(const torch::nn::Module& module, const std::string& pattern) {
  std::vector<std::string> same_depth, any;
  const size_t depth = split_dots(pattern).size();
  visit_modules(module, "", [&](const std::string& path, const torch::nn::Module&) {
    if (path.empty()) return;
    (split_dots(path).size() == depth ? same_depth : any).push_back(path);
  });
  const auto& names = same_depth.empty() ? any : same_depth;
  std::string text;
  for (size_t i = 0; i < names.size() && i < 8; ++i) text += (i ? ", '" : "'") + names[i] + "'";
  if (names.size() > 8) text += c10::str(", ... (", names.size(), " in all)");
  return text.empty() ? std::string("none: the model has no submodules") : text;
}

}  // namespace detail

/// The modules of `root` (itself included, as "") whose dotted names match `pattern` component by
/// component, in pre-order, hook slots excluded: '*' matches any run of characters within one
/// component ("layers.*.attention.core"), "" matches the root. Used by every API that takes module
/// names (tensor-parallel plans, context parallelism, pipeline stages).
inline std::vector<std::pair<std::string, torch::nn::Module*>> modules_matching(torch::nn::Module& root,
                                                                                const std::string& pattern) {
  std::vector<std::pair<std::string, torch::nn::Module*>> found;
  detail::visit_modules(root, "", [&](const std::string& path, torch::nn::Module& module) {
    if (detail::match_module_name(pattern, path)) found.emplace_back(path, &module);
  });
  return found;
}

}  // namespace titan
