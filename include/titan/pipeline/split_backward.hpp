#pragma once
// titan/pipeline/split_backward.hpp: the zero-bubble split of a stage's backward into an
// input-gradient pass and a deferred weight-gradient pass (surgery on the autograd graph).

#include <titan/detail/torch_internals.hpp>

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <vector>

namespace titan {

namespace detail {

/// Keeps the gradients an autograd node receives (its inputs, summed) when it runs.
class CaptureGradients : public torch::autograd::FunctionPreHook {
 public:
  explicit CaptureGradients(std::shared_ptr<torch::autograd::variable_list> into) : into_(std::move(into)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    *into_ = grads;
    return grads;
  }

 private:
  std::shared_ptr<torch::autograd::variable_list> into_;
};

/// A micro-batch's weight-gradient pass, prepared by its input-gradient pass. A node on the
/// input's gradient path (which the input pass runs) whose other edges lead only to parameters
/// is a branch point: the input pass captures the gradients it receives, and the weight pass
/// runs the node again from them, restricted to those parameters. The parameter-only parts of
/// the graph run once, the activation-gradient path not again (PyTorch's stage_backward_weight).
struct WeightPass {
  struct Branch {
    std::shared_ptr<torch::autograd::Node> node;
    std::shared_ptr<torch::autograd::variable_list> grads;  // captured by the input pass
    torch::autograd::edge_list params;                      // gradient edges of its parameters
  };
  std::vector<Branch> branches;

  /// Accumulates every branch's parameter gradients.
  void run() const {
    for (const auto& branch : branches) {
      torch::autograd::edge_list roots;
      torch::autograd::variable_list grads;
      for (size_t i = 0; i < branch.grads->size(); ++i) {
        if (!(*branch.grads)[i].defined()) continue;
        roots.emplace_back(branch.node, static_cast<uint32_t>(i));
        grads.push_back((*branch.grads)[i]);
      }
      // The graph stays: parameter-only nodes (a transpose of a weight) may serve two branches;
      // it is freed with the micro-batch's output.
      if (!roots.empty()) backward_into(roots, grads, branch.params);
    }
  }
};

/// Finds the branch points of `output`'s graph for `params` (see WeightPass) and hooks them, before
/// the input pass runs. nullopt when a parameter lies below two branch points (a weight used
/// twice): running them one by one would count it twice, so the caller re-runs backward instead.
inline std::optional<WeightPass> prepare_weight_pass(const at::Tensor& output, const at::Tensor& input,
                                                     const std::vector<at::Tensor>& params) {
  using torch::autograd::Node;
  std::map<const Node*, torch::autograd::Edge> accumulators;  // parameter gradient edges by node
  for (const auto& p : params)
    if (auto acc = grad_accumulator_of(p)) accumulators.emplace(acc.get(), torch::autograd::Edge(acc, 0));
  const auto input_acc = grad_accumulator_of(input);
  if (!output.grad_fn() || !input_acc) return std::nullopt;
  // Which nodes lead to the input (memoized depth-first search).
  std::map<const Node*, bool> to_input;
  std::function<bool(const Node*)> leads_to_input = [&](const Node* node) {
    if (node == input_acc.get()) return true;
    auto [it, fresh] = to_input.emplace(node, false);
    if (!fresh) return it->second;
    bool found = false;
    for (const auto& edge : node->next_edges())
      if (edge.is_valid() && leads_to_input(edge.function.get())) found = true;
    to_input[node] = found;
    return found;
  };
  leads_to_input(output.grad_fn().get());
  WeightPass pass;
  std::map<const Node*, int> owners;  // parameter node -> branch points above it
  for (const auto& [node, on_path] : to_input) {
    if (!on_path) continue;
    torch::autograd::edge_list below;
    std::set<const Node*> seen;
    std::function<void(const std::shared_ptr<Node>&)> collect = [&](const std::shared_ptr<Node>& n) {
      if (!seen.insert(n.get()).second) return;
      if (auto it = accumulators.find(n.get()); it != accumulators.end()) {
        below.push_back(it->second);
        owners[n.get()] += 1;
        return;
      }
      for (const auto& edge : n->next_edges())
        if (edge.is_valid()) collect(edge.function);
    };
    for (const auto& edge : node->next_edges()) {
      if (!edge.is_valid() || edge.function.get() == input_acc.get()) continue;
      auto it = to_input.find(edge.function.get());
      if (it != to_input.end() && it->second) continue;  // on the input's path: the input pass runs it
      collect(edge.function);
    }
    if (below.empty()) continue;
    pass.branches.push_back({std::const_pointer_cast<Node>(node->shared_from_this()),
                             std::make_shared<torch::autograd::variable_list>(), std::move(below)});
  }
  for (const auto& [param, count] : owners)
    if (count > 1) return std::nullopt;
  for (const auto& branch : pass.branches)
    branch.node->add_pre_hook(std::make_unique<CaptureGradients>(branch.grads));
  return pass;
}

}  // namespace detail

}  // namespace titan
