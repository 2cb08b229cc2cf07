#pragma once
// titan/detail/optimizer_state.hpp: LibTorch's optimizers seen through one table. Each optimizer
// keeps its per-parameter state in its own OptimizerParamState subclass; checkpoints (save and
// load) and memory accounting read and write it through the table's entries instead of a
// dynamic_cast ladder each.
//
//   const auto& kind = detail::optimizer_kind(optimizer);      // "AdamW": exp_avg, exp_avg_sq, ...
//   for (auto& [key, tensor] : kind.tensors(*state)) ...       // the defined state tensors
//   auto fresh = kind.make();  kind.set(*fresh, "exp_avg", t);  kind.set_step(*fresh, 10);

#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace titan::detail {

/// One LibTorch optimizer class and the layout of its per-parameter state.
struct OptimizerKind {
  using State = torch::optim::OptimizerParamState;
  std::string name;               ///< "AdamW", "Adam", "SGD", "Adagrad" or "RMSprop"
  std::vector<std::string> keys;  ///< the state's tensor entries, e.g. "exp_avg"
  bool has_step = false;          ///< whether the state counts steps ("step")
  std::function<bool(const torch::optim::Optimizer&)> is;  ///< whether an optimizer is of this class
  std::function<bool(const State&)> owns;                  ///< whether a state is of this class
  std::function<std::unique_ptr<State>()> make;            ///< a fresh, empty state
  std::function<at::Tensor&(State&, const std::string&)> tensor;  ///< the entry `key` (may be undefined)
  std::function<int64_t&(State&)> step;                   ///< the step counter (has_step only)

  /// The defined tensor entries of `state`, in `keys` order.
  std::vector<std::pair<std::string, at::Tensor>> tensors(const State& state) const {
    std::vector<std::pair<std::string, at::Tensor>> result;
    for (const auto& key : keys) {
      const auto& value = tensor(const_cast<State&>(state), key);
      if (value.defined()) result.emplace_back(key, value);
    }
    return result;
  }
  /// Sets entry `key` of `state`.
  void set(State& state, const std::string& key, const at::Tensor& value) const { tensor(state, key) = value; }
  /// Sets the step counter of `state` (has_step only).
  void set_step(State& state, int64_t value) const { step(state) = value; }
};

/// A table entry for optimizer class `Optimizer` whose state class `S` has the tensor entries
/// `fields` (name, accessor) and, when `counter` is set, a step counter.
template <typename Optimizer, typename S>
OptimizerKind make_optimizer_kind(std::string name, std::vector<std::pair<std::string, at::Tensor& (*)(S&)>> fields,
                                  int64_t& (*counter)(S&)) {
  OptimizerKind kind;
  kind.name = std::move(name);
  for (const auto& field : fields) kind.keys.push_back(field.first);
  kind.has_step = counter != nullptr;
  kind.is = [](const torch::optim::Optimizer& optimizer) { return dynamic_cast<const Optimizer*>(&optimizer) != nullptr; };
  kind.owns = [](const OptimizerKind::State& state) { return dynamic_cast<const S*>(&state) != nullptr; };
  kind.make = [] { return std::make_unique<S>(); };
  kind.tensor = [fields, name = kind.name](OptimizerKind::State& state, const std::string& key) -> at::Tensor& {
    for (const auto& field : fields)
      if (field.first == key) return field.second(static_cast<S&>(state));
    TORCH_CHECK(false, "titan: ", name, " optimizer state has no entry '", key, "'");
  };
  if (counter != nullptr)
    kind.step = [counter](OptimizerKind::State& state) -> int64_t& { return counter(static_cast<S&>(state)); };
  return kind;
}

/// The optimizers titan understands (checkpoints, memory accounting).
inline const std::vector<OptimizerKind>& optimizer_kinds() {
  using namespace torch::optim;
  static const std::vector<OptimizerKind> kinds = [] {
    std::vector<OptimizerKind> table;
    table.push_back(make_optimizer_kind<AdamW, AdamWParamState>(
        "AdamW",
        {{"exp_avg", [](AdamWParamState& s) -> at::Tensor& { return s.exp_avg(); }},
         {"exp_avg_sq", [](AdamWParamState& s) -> at::Tensor& { return s.exp_avg_sq(); }},
         {"max_exp_avg_sq", [](AdamWParamState& s) -> at::Tensor& { return s.max_exp_avg_sq(); }}},
        [](AdamWParamState& s) -> int64_t& { return s.step(); }));
    table.push_back(make_optimizer_kind<Adam, AdamParamState>(
        "Adam",
        {{"exp_avg", [](AdamParamState& s) -> at::Tensor& { return s.exp_avg(); }},
         {"exp_avg_sq", [](AdamParamState& s) -> at::Tensor& { return s.exp_avg_sq(); }},
         {"max_exp_avg_sq", [](AdamParamState& s) -> at::Tensor& { return s.max_exp_avg_sq(); }}},
        [](AdamParamState& s) -> int64_t& { return s.step(); }));
    table.push_back(make_optimizer_kind<SGD, SGDParamState>(
        "SGD", {{"momentum_buffer", [](SGDParamState& s) -> at::Tensor& { return s.momentum_buffer(); }}}, nullptr));
    table.push_back(make_optimizer_kind<Adagrad, AdagradParamState>(
        "Adagrad", {{"sum", [](AdagradParamState& s) -> at::Tensor& { return s.sum(); }}},
        [](AdagradParamState& s) -> int64_t& { return s.step(); }));
    table.push_back(make_optimizer_kind<RMSprop, RMSpropParamState>(
        "RMSprop",
        {{"square_avg", [](RMSpropParamState& s) -> at::Tensor& { return s.square_avg(); }},
         {"momentum_buffer", [](RMSpropParamState& s) -> at::Tensor& { return s.momentum_buffer(); }},
         {"grad_avg", [](RMSpropParamState& s) -> at::Tensor& { return s.grad_avg(); }}},
        [](RMSpropParamState& s) -> int64_t& { return s.step(); }));
    return table;
  }();
  return kinds;
}

/// "AdamW, Adam, SGD, Adagrad, RMSprop", for messages.
inline std::string optimizer_kind_names() {
  std::string text;
  for (const auto& kind : optimizer_kinds()) text += (text.empty() ? "" : ", ") + kind.name;
  return text;
}

/// The table entry of `optimizer`; `what` names the caller in the error for other optimizers.
inline const OptimizerKind& optimizer_kind(const torch::optim::Optimizer& optimizer, const char* what) {
  for (const auto& kind : optimizer_kinds())
    if (kind.is(optimizer)) return kind;
  TORCH_CHECK(false, what, ": unsupported optimizer (supported: ", optimizer_kind_names(), ")");
}

/// The table entry named `name` (as saved in a checkpoint), or nullptr.
inline const OptimizerKind* optimizer_kind_named(const std::string& name) {
  for (const auto& kind : optimizer_kinds())
    if (kind.name == name) return &kind;
  return nullptr;
}

/// The table entry owning `state`; `what` names the caller in the error for other state classes.
inline const OptimizerKind& optimizer_kind_of_state(const torch::optim::OptimizerParamState& state, const char* what) {
  for (const auto& kind : optimizer_kinds())
    if (kind.owns(state)) return kind;
  TORCH_CHECK(false, what, ": unsupported optimizer state (supported: ", optimizer_kind_names(), ")");
}

}  // namespace titan::detail
