#pragma once
// titan/fused/add_rms_norm.hpp: a residual add and the RMSNorm of its sum, one operator each way.
//
//   (sum, normed) = titan::add_rms_norm(x [..., D], delta [..., D], weight [D], eps)
//
//   sum     = x + delta                                        (in x's dtype)
//   normed  = sum * rstd * weight,  rstd = 1 / sqrt(mean(sum^2) + eps)        (as at::rms_norm)
//   d sum   = grad_sum + rms_norm's input gradient for grad_normed   (the two uses of sum, one tensor)
//   d x     = d delta = d sum,      d weight = sum over rows of grad_normed * sum * rstd
//
// A pre-norm transformer block adds its attention output to the residual stream and normalizes
// that sum for the feed-forward. Unfused that is an add and the norm forward, and in the backward
// the norm's backward and an add of the sum's two gradients (the residual stream's and the
// norm's). The operator saves the sum, the weight and rstd [..., 1] (fp32). Its ATen implementation
// is those operators (at::add, at::_fused_rms_norm, and ATen's fused RMSNorm backward where the
// device has one, else autograd through the composite norm): bitwise the unfused formulation. The
// CUDA kernel (titan/fused/cuda/add_rms_norm.cuh) writes sum and normed in one pass over x and
// delta, and the input gradient in one pass over sum, grad_normed and grad_sum (10 and 8 bytes
// per bf16 element, against 12 and 14 unfused), the weight's gradient in a second pass.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_fused_rms_norm.h>
#include <ATen/ops/_fused_rms_norm_backward.h>
#include <ATen/ops/add.h>
#include <ATen/ops/rms_norm.h>
#include <c10/core/TensorOptions.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <tuple>

namespace titan {
namespace detail {

/// Checks what the operator needs: x and delta [..., D] of one shape, weight [D], one floating
/// dtype and one device.
inline void check_add_rms_norm_inputs(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.sizes() == delta.sizes(),
              "titan::add_rms_norm: x and delta must have one shape [..., D], got ", x.sizes(), " and ",
              delta.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "titan::add_rms_norm: weight must be [D] = [",
              x.size(-1), "] (the inputs' last dimension), got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && delta.scalar_type() == x.scalar_type() &&
                  weight.scalar_type() == x.scalar_type(),
              "titan::add_rms_norm: x, delta and weight must have one floating dtype (cast the weight to the "
              "activations' dtype), got ",
              x.scalar_type(), ", ", delta.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(delta.device() == x.device() && weight.device() == x.device(),
              "titan::add_rms_norm: x, delta and weight must be on one device, got ", x.device(), ", ", delta.device(),
              " and ", weight.device());
}

/// titan::add_rms_norm_forward in ATen: sum [..., D], normed [..., D] and rstd [..., 1] (fp32 for
/// fp32, bf16 and fp16 inputs).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_forward_aten(const at::Tensor& x,
                                                                                const at::Tensor& delta,
                                                                                const at::Tensor& weight, double eps) {
  check_add_rms_norm_inputs(x, delta, weight);
  auto sum = at::add(x, delta);                                                 // [..., D]
  auto [normed, rstd] = at::_fused_rms_norm(sum, {sum.size(-1)}, weight, eps);  // [..., D], [..., 1]
  return {sum, normed, rstd};
}

/// Whether ATen has a fused RMSNorm backward kernel for `t`'s device (CUDA does; the CPU does not).
inline bool aten_has_fused_rms_norm_backward(const at::Tensor& t) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("aten::_fused_rms_norm_backward", "");
  return op.hasKernelForDispatchKey(c10::computeDispatchKey(t.scalar_type(), t.layout(), t.device()));
}

/// titan::add_rms_norm_backward in ATen: (d x = d delta, d weight) for the gradients of sum
/// (optional: undefined when sum has no other use) and of normed.
inline std::tuple<at::Tensor, at::Tensor> add_rms_norm_backward_aten(const std::optional<at::Tensor>& grad_sum,
                                                                     const at::Tensor& grad_normed,
                                                                     const at::Tensor& sum, const at::Tensor& weight,
                                                                     const at::Tensor& rstd, double eps) {
  check_add_rms_norm_inputs(sum, grad_normed, weight);
  const bool residual = grad_sum && grad_sum->defined();
  if (aten_has_fused_rms_norm_backward(sum)) {
    auto [d_sum, d_weight] = at::_fused_rms_norm_backward(grad_normed, sum, {sum.size(-1)}, rstd, weight, {true, true});
    return {residual ? at::add(*grad_sum, d_sum) : d_sum, d_weight};  // [..., D], [D]
  }
  // The composite norm's autograd, recomputed. The sum is an output too, with the residual
  // stream's gradient, so that its gradients add up in the unfused backward's order (the residual
  // one first, then the norm's two uses of its input): bitwise in every dtype.
  at::AutoGradMode enable_grad(true);
  auto input = sum.detach().requires_grad_(true);
  auto gain = weight.detach().requires_grad_(true);
  auto normed = at::rms_norm(input, {sum.size(-1)}, gain, eps);
  auto grads = residual ? torch::autograd::grad({input, normed}, {input, gain}, {*grad_sum, grad_normed})
                        : torch::autograd::grad({normed}, {input, gain}, {grad_normed});
  return {grads[0], grads[1]};
}

/// Autograd of titan::add_rms_norm: saves sum, weight and rstd.
struct AddRmsNormFunction : torch::autograd::Function<AddRmsNormFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& delta, const at::Tensor& weight, double eps) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("titan::add_rms_norm_forward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
    auto [sum, normed, rstd] = op.call(x, delta, weight, eps);
    ctx->save_for_backward({sum, weight, rstd});
    ctx->saved_data["eps"] = eps;
    return {sum, normed};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("titan::add_rms_norm_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, double)>();
    const auto saved = ctx->get_saved_variables();  // sum, weight, rstd
    const auto& grad_sum = grad_outputs[0];         // [..., D] or undefined
    const auto& grad_normed = grad_outputs[1];      // [..., D] or undefined
    if (!grad_normed.defined()) return {grad_sum, grad_sum, at::Tensor(), at::Tensor()};
    std::optional<at::Tensor> residual;
    if (grad_sum.defined()) residual = grad_sum.contiguous();
    auto [d_input, d_weight] =
        op.call(residual, grad_normed.contiguous(), saved[0], saved[1], saved[2], ctx->saved_data["eps"].toDouble());
    return {d_input, d_input, d_weight, at::Tensor()};
  }
};

/// titan::add_rms_norm's kernel (CompositeImplicitAutograd).
inline std::tuple<at::Tensor, at::Tensor> add_rms_norm_kernel(const at::Tensor& x, const at::Tensor& delta,
                                                              const at::Tensor& weight, double eps) {
  auto outputs = AddRmsNormFunction::apply(x, delta, weight, eps);
  return {outputs[0], outputs[1]};
}

}  // namespace detail

/// Registers titan::add_rms_norm, titan::add_rms_norm_forward and titan::add_rms_norm_backward with
/// the dispatcher once per process (titan::add_rms_norm calls it; call it before naming them
/// elsewhere). CUDA kernels registered for the last two (titan::cuda_kernels) take precedence on
/// CUDA tensors.
inline void register_add_rms_norm_operators() {
  static const std::unique_ptr<torch::Library> library = [] {
    auto lib = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "titan", std::nullopt,
                                                "titan/fused/add_rms_norm.hpp", __LINE__);
    lib->def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
    lib->def("add_rms_norm_forward(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
    lib->def(
        "add_rms_norm_backward(Tensor? grad_sum, Tensor grad_normed, Tensor sum, Tensor weight, Tensor rstd, "
        "float eps) -> (Tensor, Tensor)");
    lib->impl("add_rms_norm",
              torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(detail::add_rms_norm_kernel)));
    lib->impl("add_rms_norm_forward", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                                      TORCH_FN(detail::add_rms_norm_forward_aten)));
    lib->impl("add_rms_norm_backward", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                                       TORCH_FN(detail::add_rms_norm_backward_aten)));
    return lib;
  }();
  (void)library;
}

/// The residual add x + delta and its RMSNorm (weight [D] in the inputs' dtype, as at::rms_norm's
/// fused path needs), with autograd: (sum, normed), both [..., D].
inline std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta,
                                                       const at::Tensor& weight, double eps) {
  register_add_rms_norm_operators();
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("titan::add_rms_norm", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, delta, weight, eps);  // titan::add_rms_norm_forward checks the inputs
}

}  // namespace titan
