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
// so applying TP, then AC, then FSDP (torchtitan's order) runs FSDP's all-gather first, then the
// checkpointed region, then TP's layouts around the user's forward.
//
// Tensor arguments are handed to hooks as a list (they may be replaced, e.g. redistributed by TP);
// other arguments are bound by value, so a hook may run the forward again later (activation
// checkpointing recomputes it during backward). forward must return a single at::Tensor.

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace titan {

/// Tensors in, tensors out.
using TensorList = std::vector<at::Tensor>;
/// Runs the rest of a module call (inner hooks and forward) on the given tensor inputs.
using ForwardFn = std::function<at::Tensor(const TensorList&)>;

/// Behaviour attached to a module and run by titan::call around its forward.
class ModuleHook {
 public:
  virtual ~ModuleHook() = default;
  /// A short name for messages, e.g. "fsdp" or "checkpoint".
  virtual std::string name() const = 0;
  /// Runs the module: typically prepares `inputs`, calls `next(inputs)`, post-processes the output.
  virtual at::Tensor forward(torch::nn::Module& module, const TensorList& inputs, const ForwardFn& next) = 0;
};

namespace detail {

/// The child module holding a module's hooks, innermost first.
class HookSlotImpl : public torch::nn::Module {
 public:
  std::vector<std::shared_ptr<ModuleHook>> hooks;
};

inline constexpr const char* kHookSlotName = "_titan_hooks";

inline std::shared_ptr<HookSlotImpl> hook_slot(const torch::nn::Module& module) {
  for (const auto& child : module.named_children()) {
    if (child.key() == kHookSlotName) return std::dynamic_pointer_cast<HookSlotImpl>(child.value());
  }
  return nullptr;
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
at::Tensor call_bound(Impl& module, const Bound& bound, const TensorList& tensors, std::index_sequence<I...>) {
  size_t next = 0;
  // Braced initialisation evaluates left to right, so tensors are taken in argument order.
  Bound replaced{replace_tensor(std::get<I>(bound), tensors, next)...};
  TORCH_CHECK(next == tensors.size(), "titan::call: a hook passed ", tensors.size(), " tensors to a forward taking ",
              next);
  return std::apply([&module](auto&... args) { return module.forward(args...); }, replaced);
}

}  // namespace detail

/// Attaches `hook` to `module`, outside the hooks already there.
inline void attach_hook(torch::nn::Module& module, std::shared_ptr<ModuleHook> hook) {
  TORCH_CHECK(hook, "titan::attach_hook: null hook");
  auto slot = detail::hook_slot(module);
  if (!slot) slot = module.register_module(detail::kHookSlotName, std::make_shared<detail::HookSlotImpl>());
  slot->hooks.push_back(std::move(hook));
}

/// The hooks attached to `module`, innermost first.
inline std::vector<std::shared_ptr<ModuleHook>> hooks_of(const torch::nn::Module& module) {
  auto slot = detail::hook_slot(module);
  return slot ? slot->hooks : std::vector<std::shared_ptr<ModuleHook>>{};
}

/// The innermost hook of type H attached to `module`, or nullptr.
template <typename H>
std::shared_ptr<H> find_hook(const torch::nn::Module& module) {
  for (const auto& hook : hooks_of(module))
    if (auto typed = std::dynamic_pointer_cast<H>(hook)) return typed;
  return nullptr;
}

/// Calls `module`'s forward with `args` through the hooks titan attached to it (see the top of
/// this header). `module` may be a module, a ModuleHolder (e.g. torch::nn::Linear), a shared_ptr or
/// a pointer to one.
template <typename M, typename... Args>
at::Tensor call(M&& module, Args&&... args) {
  auto& impl = detail::module_ref(module);
  using Impl = std::remove_reference_t<decltype(impl)>;
  static_assert(std::is_same_v<decltype(impl.forward(std::forward<Args>(args)...)), at::Tensor>,
                "titan::call supports modules whose forward returns a single at::Tensor");
  auto slot = detail::hook_slot(impl);
  if (!slot || slot->hooks.empty()) return impl.forward(std::forward<Args>(args)...);

  TensorList inputs;
  (detail::collect_tensor(args, inputs), ...);
  auto bound = std::make_shared<std::tuple<std::decay_t<Args>...>>(std::forward<Args>(args)...);
  Impl* self = &impl;
  ForwardFn run = [self, bound](const TensorList& tensors) {
    return detail::call_bound(*self, *bound, tensors, std::index_sequence_for<Args...>{});
  };
  // Wrap from the innermost hook outwards; the outermost runs first.
  auto hooks = slot->hooks;
  for (const auto& hook : hooks) {
    run = [self, hook, inner = std::move(run)](const TensorList& tensors) { return hook->forward(*self, tensors, inner); };
  }
  return run(inputs);
}

}  // namespace titan
