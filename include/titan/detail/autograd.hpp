#pragma once
// titan/detail/autograd.hpp: attach a hand-written backward to tensors computed without autograd.
// torch::autograd::Function keeps non-tensor state only as IValues; collectives need a process
// group in their backward, so titan builds its nodes from a closure instead.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>

namespace titan::detail {

/// How many checkpointed regions this thread is recomputing (titan/ac.hpp). A region's backward
/// runs right after its recomputation, so what a layer keeps for its backward while this is
/// nonzero lives through that region's backward only.
inline int& recomputation_depth() {
  thread_local int depth = 0;
  return depth;
}

/// Maps the gradients of a node's outputs to the gradients of its inputs.
using BackwardFn = std::function<torch::autograd::variable_list(torch::autograd::variable_list&&)>;

/// An autograd node whose backward is a closure.
class ClosureNode : public torch::autograd::Node {
 public:
  ClosureNode(std::string name, BackwardFn backward) : name_(std::move(name)), backward_(std::move(backward)) {}
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    return backward_(std::move(grads));
  }
  std::string name() const override { return name_; }
  void release_variables() override { backward_ = nullptr; }

 private:
  std::string name_;
  BackwardFn backward_;
};

/// Makes `outputs` (computed under no-grad from `inputs`) differentiable: their gradients flow to
/// `inputs` through `backward`, which receives one gradient per output (undefined ones replaced
/// by zeros) and returns one per input. Does nothing when no input requires grad.
inline void connect_backward(const torch::autograd::variable_list& inputs, torch::autograd::variable_list& outputs,
                             const std::string& name, BackwardFn backward) {
  if (!torch::autograd::GradMode::is_enabled()) return;
  bool any = false;
  for (const auto& input : inputs) any = any || (input.defined() && input.requires_grad());
  if (!any) return;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<c10::TensorOptions> options;
  for (const auto& output : outputs) {
    shapes.push_back(output.sizes().vec());
    options.push_back(output.options());
  }
  auto wrapped = [backward = std::move(backward), shapes = std::move(shapes),
                  options = std::move(options)](torch::autograd::variable_list&& grads) {
    for (size_t i = 0; i < grads.size(); ++i)
      if (!grads[i].defined()) grads[i] = at::zeros(shapes[i], options[i]);
    return backward(std::move(grads));
  };
  std::shared_ptr<ClosureNode> node(new ClosureNode(name, std::move(wrapped)), torch::autograd::deleteNode);
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  for (auto& output : outputs) {
    if (output.is_floating_point() || output.is_complex()) torch::autograd::set_history(output, node);
  }
}

}  // namespace titan::detail
