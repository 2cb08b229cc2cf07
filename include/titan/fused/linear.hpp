#pragma once
// titan/fused/linear.hpp: linear layers that read the same input, as one GEMM.
//
//   auto qkv = titan::linear_fused(x, {wq->weight, wk->weight, wv->weight});   // q, k, v
//
// y_i = x W_i^T for weights W_i [out_i, in] is computed as x [W_0; W_1; ...]^T, one GEMM whose
// output [..., sum out_i] is returned as one view per weight ([..., out_i], rows strided by the
// sum). The layers keep their own parameters, so state-dict names, checkpoints, Hugging Face
// adapters and tensor-parallel plans are those of the separate layers. Weights that already lie end
// to end in one storage (the unsharded parameters of one FSDP unit, registered one after the other)
// are the GEMM's matrix as they are; others are copied into one, at every call (not kept for the
// backward: FSDP may free the parameters between forward and backward). The backward
// takes each output's gradient as it comes: the input's gradient accumulates in the GEMMs
// themselves (x.grad = g_0 W_0, then += g_i W_i through addmm's beta = 1), so the adds that sum
// the separate layers' input gradients are gone, and each weight's gradient is g_i^T x.
// titan::call_fused runs such a computation through the layers' hooks (hooks.hpp).

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/as_strided.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

namespace titan {
namespace detail {

/// Checks what linear_fused needs: 2-D weights of x's last dimension, dtype and device.
inline void check_linear_fused(const at::Tensor& x, at::TensorList weights) {
  TORCH_CHECK(!weights.empty(), "titan::linear_fused: no weights given");
  TORCH_CHECK(x.dim() >= 1, "titan::linear_fused: the input must have a feature dimension, got a scalar");
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), "titan::linear_fused: weight ", i,
                " must be [out, ", x.size(-1), "] for an input of shape ", x.sizes(), ", got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), "titan::linear_fused: weight ", i,
                " is ", w.scalar_type(), " on ", w.device(), " but the input is ", x.scalar_type(), " on ", x.device());
  }
}

/// The weights [out_i, in] as one matrix [sum out_i, in]: a view when they lie end to end in one
/// storage, contiguous (FSDP's unsharded parameters of one unit), else their concatenation.
inline at::Tensor stacked_weights(at::TensorList weights) {
  if (weights.size() == 1) return weights[0];
  bool adjacent = weights[0].is_contiguous();
  int64_t rows = weights[0].size(0);
  for (size_t i = 1; adjacent && i < weights.size(); ++i) {
    const auto& before = weights[i - 1];
    adjacent = weights[i].is_contiguous() && weights[i].is_alias_of(weights[0]) &&
               weights[i].storage_offset() == before.storage_offset() + before.numel();
    rows += weights[i].size(0);
  }
  if (!adjacent) return at::cat(weights, 0);
  const int64_t in = weights[0].size(1);
  return weights[0].as_strided({rows, in}, {in, 1}, weights[0].storage_offset());  // [sum out_i, in], no copy
}

/// Autograd of titan::linear_fused: saves the input and the weights (not their concatenation).
struct LinearFusedFunction : torch::autograd::Function<LinearFusedFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                at::TensorList weights) {
    check_linear_fused(x, weights);
    std::vector<int64_t> sizes;
    for (const auto& w : weights) sizes.push_back(w.size(0));
    const auto fused_weight = stacked_weights(weights);  // [sum out_i, in]
    auto y = at::linear(x, fused_weight);                // [..., sum out_i]
    torch::autograd::variable_list saved{x};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->set_materialize_grads(false);  // an output that reaches no loss costs its GEMMs nothing
    return y.split_with_sizes(sizes, -1);  // [..., out_i] each
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];                            // [..., in]
    const auto x_rows = x.reshape({-1, x.size(-1)});     // [T, in]
    torch::autograd::variable_list result(saved.size());  // d x, then d W_i
    at::Tensor grad_x;                                   // [T, in]
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined()) continue;  // an output that reached no loss
      const auto& w = saved[i + 1];                                 // [out_i, in]
      const auto g = grads[i].reshape({-1, w.size(0)});             // [T, out_i]
      if (ctx->needs_input_grad(0))
        grad_x = grad_x.defined() ? grad_x.addmm_(g, w) : at::mm(g, w);  // [T, in], summed in the GEMM
      if (ctx->needs_input_grad(i + 1)) result[i + 1] = at::mm(g.t(), x_rows);  // [out_i, in]
    }
    if (grad_x.defined()) result[0] = grad_x.view(x.sizes());
    return result;
  }
};

}  // namespace detail

/// The outputs x W_i^T [..., out_i] of linear layers without bias that read the same input x
/// [..., in], computed by one GEMM over the weights W_i [out_i, in] laid end to end (see the top
/// of this header); each output is a view of the GEMM's result. With autograd to x and every W_i.
inline std::vector<at::Tensor> linear_fused(const at::Tensor& x, at::TensorList weights) {
  return detail::LinearFusedFunction::apply(x, weights);
}

}  // namespace titan
