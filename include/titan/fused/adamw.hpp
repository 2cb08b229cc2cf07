#pragma once
// titan/fused/adamw.hpp: one AdamW step over fp32 parameters that also writes their compute-dtype
// copy (e.g. bf16), from gradients in either dtype.
//
//   titan::adamw_copy_(params, grads, exp_avgs, exp_avg_sqs, copies, steps,
//                      titan::AdamWCopyOptions().lr(3e-4).weight_decay(0.1), grad_scale, found_inf);
//
// For each parameter p (with gradient g, moments m and v, step count t, copy c):
//
//   g = g / grad_scale                      (if given; the scaled g is written back, as ATen's kernel does)
//   p = p - lr * weight_decay * p
//   m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//   c = p rounded to c's dtype              (always, also when found_inf skips the update)
//
// which is torch.optim.AdamW's arithmetic (ATen's _fused_adamw_, amsgrad and maximize off), with g
// read in its own dtype and widened. It is the optimizer step of a one-rank FSDP unit that keeps
// its compute copy (FsdpOptions::keep_compute_copy): the bf16 gradients are read as they are and
// the bf16 copy the next forward computes with is written in the same pass, instead of casting the
// gradients to fp32 after backward and the parameters to bf16 before the next forward. Bytes per
// bf16-copied fp32 parameter: 28 with titan's CUDA kernel (titan/fused/cuda/adamw.cuh), 40 for the
// two casts and ATen's fused AdamW. The ATen implementation (CPU, and any device without the
// kernel) is that cast, _fused_adamw_ and copy: the same values, bitwise.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_foreach_copy.h>
#include <ATen/ops/_fused_adamw.h>
#include <torch/csrc/api/include/torch/arg.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <optional>
#include <vector>

namespace titan {

/// Hyperparameters of titan::adamw_copy_ (torch.optim.AdamW's, amsgrad and maximize off).
struct AdamWCopyOptions {
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, beta1) = 0.9;
  TORCH_ARG(double, beta2) = 0.999;
  TORCH_ARG(double, weight_decay) = 1e-2;
  TORCH_ARG(double, eps) = 1e-8;
};

namespace detail {

/// Checks titan::adamw_copy_'s lists: one entry per parameter; moments of the parameter's shape and
/// dtype; gradient and copy of its shape in a floating dtype; a 0-dim float step count; one device.
inline void check_adamw_copy_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                    at::TensorList exp_avg_sqs, at::TensorList copies, at::TensorList steps) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && copies.size() == n &&
                  steps.size() == n,
              "titan::adamw_copy_: every list must have one entry per parameter (", n, "), got ", grads.size(),
              " gradients, ", exp_avgs.size(), " and ", exp_avg_sqs.size(), " moments, ", copies.size(),
              " copies, ", steps.size(), " step counts");
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "titan::adamw_copy_: parameter ", i, " is ", p.scalar_type(),
                "; expected a floating dtype");
    for (const auto* t : {&exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->sizes() == p.sizes() && t->scalar_type() == p.scalar_type(), "titan::adamw_copy_: moment of ",
                  "parameter ", i, " is ", t->scalar_type(), " ", t->sizes(), "; expected the parameter's ",
                  p.scalar_type(), " ", p.sizes());
    for (const auto* t : {&grads[i], &copies[i]})
      TORCH_CHECK(t->sizes() == p.sizes() && at::isFloatingType(t->scalar_type()), "titan::adamw_copy_: gradient ",
                  "or copy of parameter ", i, " is ", t->scalar_type(), " ", t->sizes(),
                  "; expected a floating dtype and the parameter's shape ", p.sizes());
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat, "titan::adamw_copy_: step count ", i,
                " must be a one-element float32 tensor, got ", steps[i].scalar_type(), " ", steps[i].sizes());
    for (const auto* t : {&grads[i], &exp_avgs[i], &exp_avg_sqs[i], &copies[i], &steps[i]})
      TORCH_CHECK(t->device() == p.device(), "titan::adamw_copy_: parameter ", i, " is on ", p.device(),
                  " but one of its gradient, moments, copy or step count on ", t->device());
  }
}

/// titan::adamw_copy_ in ATen: the gradients cast to the parameters' dtype, ATen's fused AdamW,
/// the parameters copied (and cast) into the copies. Lists of mixed dtypes run per parameter dtype.
inline void adamw_copy_aten(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList copies, at::TensorList steps, double lr,
                            double beta1, double beta2, double weight_decay, double eps,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_adamw_copy_inputs(params, grads, exp_avgs, exp_avg_sqs, copies, steps);
  struct Lists {
    std::vector<at::Tensor> p, g, m, v, s;
    std::vector<at::Tensor> narrow, widened;  // gradients of another dtype, and their casts in g
  };
  std::map<at::ScalarType, Lists> by_dtype;  // ATen's kernel takes one parameter dtype per call
  for (size_t i = 0; i < params.size(); ++i) {
    const auto dtype = params[i].scalar_type();
    auto& l = by_dtype[dtype];
    l.p.push_back(params[i]);
    l.g.push_back(grads[i].scalar_type() == dtype ? grads[i] : grads[i].to(dtype));
    if (grads[i].scalar_type() != dtype) {
      l.narrow.push_back(grads[i]);
      l.widened.push_back(l.g.back());
    }
    l.m.push_back(exp_avgs[i]);
    l.v.push_back(exp_avg_sqs[i]);
    l.s.push_back(steps[i]);
  }
  for (auto& [dtype, l] : by_dtype) {
    at::_fused_adamw_(l.p, l.g, l.m, l.v, /*max_exp_avg_sqs=*/{}, l.s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, grad_scale, found_inf);
    // The scaled gradients written back, as the kernel does.
    if (grad_scale.has_value() && !l.narrow.empty()) at::_foreach_copy_(l.narrow, l.widened);
  }
  std::vector<at::Tensor> targets(copies.begin(), copies.end()), sources(params.begin(), params.end());
  if (!targets.empty()) at::_foreach_copy_(targets, sources);  // one foreach copy (and cast)
}

}  // namespace detail

/// Registers titan::adamw_copy_ with the dispatcher once per process (titan::adamw_copy_ calls it;
/// call it before naming the operator elsewhere). A CUDA kernel registered for it
/// (titan::cuda_kernels) takes precedence on CUDA tensors.
inline void register_adamw_operators() {
  static const std::unique_ptr<torch::Library> library = [] {
    auto lib =
        std::make_unique<torch::Library>(torch::Library::FRAGMENT, "titan", std::nullopt, "titan/fused/adamw.hpp", __LINE__);
    lib->def(
        "adamw_copy_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
        "Tensor(e!)[] copies, Tensor[] state_steps, float lr, float beta1, float beta2, float weight_decay, "
        "float eps, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
    lib->impl("adamw_copy_",
              torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(detail::adamw_copy_aten)));
    return lib;
  }();
  (void)library;
}

/// One AdamW step over `params` (torch.optim.AdamW's arithmetic; see the top of this file) that
/// also writes each parameter, rounded, into `copies` (one per parameter, its shape, any floating
/// dtype). `grads` may be narrower than the parameters (bf16 gradients of fp32 parameters); where
/// `grad_scale` (1 element, float32) is given they are divided by it and written back scaled.
/// `found_inf` (1 element, float32) equal to 1 skips the update, as in ATen's fused AdamW (a
/// GradScaler writes 0 or 1); the copies are written either way.
/// `steps`: each parameter's step count after this step (1-element float32 tensors, as ATen's).
inline void adamw_copy_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList copies, at::TensorList steps,
                        const AdamWCopyOptions& options, const std::optional<at::Tensor>& grad_scale = std::nullopt,
                        const std::optional<at::Tensor>& found_inf = std::nullopt) {
  register_adamw_operators();
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("titan::adamw_copy_", "")
          .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      double, double, double, double, double, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&)>();
  op.call(params, grads, exp_avgs, exp_avg_sqs, copies, steps, options.lr(), options.beta1(), options.beta2(),
          options.weight_decay(), options.eps(), grad_scale, found_inf);
}

}  // namespace titan
