#pragma once
// titan/fused/swiglu.hpp: SwiGLU's gate, silu(gate) * up, as one operator each way.
//
//   out    = silu(a) * b                     silu(a) = a * sigmoid(a)
//   d_a    = g * b * silu'(a)                silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)
//   d_b    = g * silu(a)
//
// The operator saves its inputs a and b (which the projections before it produce anyway), not
// silu(a): one [.., hidden] activation less per layer than silu then mul. The ATen implementation
// computes what silu and mul (and their backwards) compute, so it matches them bitwise; the CUDA
// kernel (titan/fused/cuda/swiglu.cuh) does each direction in one pass in fp32 (6 bytes per bf16
// element forward, 10 backward, against 10 and 18 for silu, mul and their backwards).

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <memory>
#include <tuple>

namespace titan {
namespace detail {

/// Checks what SwiGLU needs: gate and up of the same shape, floating dtype and device.
inline void check_swiglu_inputs(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "titan::swiglu: gate and up must have the same shape, got ", gate.sizes(),
              " and ", up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type() && at::isFloatingType(gate.scalar_type()),
              "titan::swiglu: gate and up must have the same floating dtype, got ", gate.scalar_type(), " and ",
              up.scalar_type());
  TORCH_CHECK(gate.device() == up.device(), "titan::swiglu: gate is on ", gate.device(), " but up on ", up.device());
}

/// Checks what SwiGLU's backward needs: the inputs' checks, and an output gradient of their shape.
inline void check_swiglu_grad(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_inputs(gate, up);
  TORCH_CHECK(grad.sizes() == gate.sizes(), "titan::swiglu: the output gradient must have the input's shape ",
              gate.sizes(), ", got ", grad.sizes());
}

/// titan::swiglu_forward in ATen: silu(gate) * up [...].
inline at::Tensor swiglu_forward_aten(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_inputs(gate, up);
  return at::silu(gate).mul_(up);  // [...]
}

/// titan::swiglu_backward in ATen: (d gate, d up) [...] for the output gradient `grad`.
inline std::tuple<at::Tensor, at::Tensor> swiglu_backward_aten(const at::Tensor& grad, const at::Tensor& gate,
                                                               const at::Tensor& up) {
  check_swiglu_grad(grad, gate, up);
  auto d_gate = at::silu_backward(grad.mul(up), gate);  // [...]
  auto d_up = at::silu(gate).mul_(grad);             // [...]
  return {d_gate, d_up};
}

/// Autograd of titan::swiglu: saves gate and up, recomputes silu in the backward.
struct SwiGluFunction : torch::autograd::Function<SwiGluFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("titan::swiglu_forward", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    ctx->save_for_backward({gate, up});
    return op.call(gate, up);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("titan::swiglu_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    auto [d_gate, d_up] = op.call(grad_outputs[0].contiguous(), saved[0], saved[1]);
    return {d_gate, d_up};
  }
};

/// titan::swiglu's kernel (CompositeImplicitAutograd).
inline at::Tensor swiglu_kernel(const at::Tensor& gate, const at::Tensor& up) {
  return SwiGluFunction::apply(gate, up);
}

}  // namespace detail

/// Registers titan::swiglu, titan::swiglu_forward and titan::swiglu_backward with the dispatcher
/// once per process (titan::swiglu calls it; call it before naming them elsewhere). CUDA kernels
/// registered for the last two (titan::cuda_kernels) take precedence on CUDA tensors.
inline void register_swiglu_operators() {
  static const std::unique_ptr<torch::Library> library = [] {
    auto lib =
        std::make_unique<torch::Library>(torch::Library::FRAGMENT, "titan", std::nullopt, "titan/fused/swiglu.hpp", __LINE__);
    lib->def("swiglu(Tensor gate, Tensor up) -> Tensor");
    lib->def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
    lib->def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
    lib->impl("swiglu", torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(detail::swiglu_kernel)));
    lib->impl("swiglu_forward", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                                TORCH_FN(detail::swiglu_forward_aten)));
    lib->impl("swiglu_backward", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                                 TORCH_FN(detail::swiglu_backward_aten)));
    return lib;
  }();
  (void)library;
}

/// SwiGLU's gate: silu(gate) * up for gate and up of the same shape and floating dtype, with
/// autograd (the gradient from gate and up; silu is recomputed in the backward, not kept).
inline at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  register_swiglu_operators();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("titan::swiglu", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(gate, up);  // titan::swiglu_forward checks gate and up
}

}  // namespace titan
