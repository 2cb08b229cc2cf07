#pragma once
// titan/checkpoint/state.hpp: TrainState, what a checkpoint saves and restores, and the names its
// parts take in a checkpoint (model.*, optim.*, component.*, extra.* tensors; titan.* extra state).

#include <titan/checkpoint/stateful.hpp>
#include <titan/detail/optimizer_state.hpp>
#include <titan/sharding.hpp>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace titan {

/// What a checkpoint saves and restores. Loading fills these in place (the model's parameters and
/// buffers, the optimizer's state, the components, `tensors`, `extra` and `rank_extra`).
struct TrainState {
  /// Parameters (with their layouts from titan::sharded_parameters) and buffers (replicated),
  /// saved as "model.<name>".
  torch::nn::Module* model = nullptr;
  /// A LibTorch AdamW, Adam, SGD, Adagrad or RMSprop over parameters of `model`; its per-parameter
  /// state is saved by parameter name ("optim.<name>.exp_avg", ...), sharded like the parameter,
  /// plus each group's learning rate.
  torch::optim::Optimizer* optimizer = nullptr;
  /// Named components (add()): tensors saved as "component.<name>.<key>", values in the
  /// metadata's extra state. A load fails if the checkpoint lacks a registered component.
  std::vector<std::pair<std::string, Stateful*>> components;
  /// More tensors to save as "extra.<name>". On load their local tensors are overwritten, so they
  /// must already have the right shape.
  ShardedStateDict tensors;
  /// Small global state as strings (step, resolved config): rank 0's copy is saved.
  std::map<std::string, std::string> extra;
  /// This rank's own state. On load it is the saved state of the same rank when the world size is
  /// unchanged, else empty (read all of them from the metadata).
  std::map<std::string, std::string> rank_extra;

  /// Registers `component` under `name` (letters, digits and '_'; unique). It must outlive the
  /// saves and loads of this TrainState.
  TrainState& add(const std::string& name, Stateful& component) {
    auto plain = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
    TORCH_CHECK(!name.empty() && std::all_of(name.begin(), name.end(), plain), "titan::TrainState::add: component ",
                "name '", name, "' must be letters, digits and '_'");
    for (const auto& [other, _] : components)
      TORCH_CHECK(other != name, "titan::TrainState::add: a component named '", name, "' is already registered");
    components.emplace_back(name, &component);
    return *this;
  }
};

namespace detail {

inline constexpr const char* kComponentPrefix = "titan.component.";

/// Each component of `state` with its current state (state() is called once per save).
using ComponentStates = std::vector<std::pair<std::string, ComponentState>>;
inline ComponentStates component_states(const TrainState& state) {
  ComponentStates states;
  for (const auto& [name, stateful] : state.components) states.emplace_back(name, stateful->state());
  return states;
}

/// Parameters (with layouts) and buffers of `model`, optimizer state by parameter name, the
/// components' tensors and the extra tensors of `state`, as named sharded tensors.
inline std::vector<std::pair<std::string, ShardedTensor>> state_tensors(const TrainState& state,
                                                                       const ComponentStates& components = {}) {
  std::vector<std::pair<std::string, ShardedTensor>> result;
  std::unordered_map<const void*, std::pair<std::string, ShardedTensor>> by_impl;
  if (state.model != nullptr) {
    for (auto& [name, tensor] : sharded_parameters(*state.model)) {
      by_impl.emplace(tensor.local.unsafeGetTensorImpl(), std::make_pair(name, tensor));
      result.emplace_back("model." + name, tensor);
    }
    for (const auto& buffer : state.model->named_buffers(/*recurse=*/true))
      result.emplace_back("model." + buffer.key(), replicated(buffer.value()));
  }
  if (state.optimizer != nullptr) {
    TORCH_CHECK(state.model != nullptr, "titan checkpoint: TrainState has an optimizer but no model "
                "(optimizer state is saved by parameter name)");
    auto& optimizer = *state.optimizer;
    const auto& kind = optimizer_kind(optimizer, "titan checkpoint");
    for (const auto& group : optimizer.param_groups()) {
      for (const auto& param : group.params()) {
        auto found = by_impl.find(param.unsafeGetTensorImpl());
        TORCH_CHECK(found != by_impl.end(), "titan checkpoint: the optimizer holds a parameter of shape ",
                    param.sizes(), " that is not a parameter of the model (built before fully_shard? see ",
                    "titan::verify_optimizer)");
        const auto& [name, sharded] = found->second;
        auto it = optimizer.state().find(param.unsafeGetTensorImpl());
        if (it == optimizer.state().end()) continue;  // not stepped yet
        for (const auto& [key, tensor] : kind.tensors(*it->second))
          result.emplace_back("optim." + name + "." + key, ShardedTensor{tensor, sharded.layout, sharded.blocks});
        if (kind.has_step)
          result.emplace_back("optim." + name + ".step", replicated(at::scalar_tensor(kind.step(*it->second), at::kLong)));
      }
    }
  }
  for (const auto& [component, saved] : components)
    for (const auto& [key, tensor] : saved.tensors) result.emplace_back("component." + component + "." + key, tensor);
  for (const auto& [name, tensor] : state.tensors) result.emplace_back("extra." + name, tensor);
  return result;
}

/// A double as exact text ("%a") and back.
inline std::string exact_double(double value) {
  char text[64];
  std::snprintf(text, sizeof(text), "%a", value);
  return text;
}

/// Global extra state of `state`, plus the optimizer's kind and learning rates and the components'
/// values (under "titan.").
inline std::map<std::string, std::string> state_extra(const TrainState& state, const ComponentStates& components) {
  auto extra = state.extra;
  for (const auto& [key, value] : extra)
    TORCH_CHECK(key.rfind("titan.", 0) != 0, "titan checkpoint: extra state key '", key,
                "' starts with 'titan.', which is reserved");
  if (state.optimizer != nullptr) {
    extra["titan.optimizer"] = optimizer_kind(*state.optimizer, "titan checkpoint").name;
    const auto& groups = state.optimizer->param_groups();
    for (size_t i = 0; i < groups.size(); ++i)
      extra["titan.optimizer.lr." + std::to_string(i)] = exact_double(groups[i].options().get_lr());
  }
  for (const auto& [component, saved] : components) {
    extra[kComponentPrefix + component] = "";  // present even when it has no values
    for (const auto& [key, value] : saved.values) extra[kComponentPrefix + component + "." + key] = value;
  }
  return extra;
}

}  // namespace detail

}  // namespace titan
