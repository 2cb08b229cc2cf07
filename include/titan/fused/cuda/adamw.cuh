#pragma once
// titan/fused/cuda/adamw.cuh: the CUDA kernel of titan::adamw_copy_ (see titan/fused/adamw.hpp for
// the formulas): one pass over fp32 parameters and moments that reads the gradients in their own
// dtype and writes the parameters' copy in its own, launched over all the tensors at once by ATen's
// multi-tensor apply (the launcher of ATen's own _fused_adamw_). Its arithmetic is that kernel's
// (the same fused multiply-adds in fp32), so parameters and moments match ATen's fused AdamW on the
// widened gradients. Other parameters than fp32 ones, mixed dtypes within a list, other dtypes than
// fp32, fp16 and bf16, non-contiguous tensors and tensors on another device than the first
// parameter's take the ATen implementation. Compiled by nvcc into titan::cuda_kernels.
#include <titan/fused/adamw.hpp>
#include <titan/fused/cuda/adamw_functor.cuh>
#include <titan/fused/cuda/inputs.cuh>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/cuda/MultiTensorApply.cuh>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <vector>

namespace titan::cuda {
namespace detail {

/// Whether the kernel takes these lists: fp32 parameters, one gradient dtype and one copy dtype
/// (fp32, fp16 or bf16), every tensor contiguous and on the first parameter's device (as the
/// launch), scale and flag (if given) float32 there.
inline bool adamw_copy_kernel_applies(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_sqs, at::TensorList copies,
                                      const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf) {
  if (!kernel_dtype(grads[0].scalar_type()) || !kernel_dtype(copies[0].scalar_type())) return false;
  const auto device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].scalar_type() != at::kFloat || grads[i].scalar_type() != grads[0].scalar_type() ||
        copies[i].scalar_type() != copies[0].scalar_type())
      return false;
    for (const auto* t : {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i], &copies[i]})
      if (!t->is_contiguous() || t->device() != device) return false;
  }
  for (const auto* t : {&grad_scale, &found_inf})
    if (t->has_value() && ((*t)->scalar_type() != at::kFloat || (*t)->device() != device)) return false;
  return true;
}

}  // namespace detail

/// titan::adamw_copy_ on CUDA tensors.
inline void adamw_copy_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList copies, at::TensorList steps, double lr,
                        double beta1, double beta2, double weight_decay, double eps,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  titan::detail::check_adamw_copy_inputs(params, grads, exp_avgs, exp_avg_sqs, copies, steps);
  if (params.empty()) return;
  if (!detail::adamw_copy_kernel_applies(params, grads, exp_avgs, exp_avg_sqs, copies, grad_scale, found_inf))
    return titan::detail::adamw_copy_aten(params, grads, exp_avgs, exp_avg_sqs, copies, steps, lr, beta1, beta2,
                                          weight_decay, eps, grad_scale, found_inf);
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<std::vector<at::Tensor>> lists = {params.vec(), grads.vec(), exp_avgs.vec(), exp_avg_sqs.vec(),
                                                copies.vec()};
  const float* scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* skip = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  TITAN_DISPATCH_KERNEL_DTYPES(grads[0].scalar_type(), "titan::adamw_copy_ (grads)", [&] {
    using grad_t = scalar_t;
    TITAN_DISPATCH_KERNEL_DTYPES(copies[0].scalar_type(), "titan::adamw_copy_ (copies)", [&] {
      at::native::multi_tensor_apply_for_fused_optimizer<detail::kAdamWCopyLists>(
          lists, steps, detail::AdamWCopyFunctor<grad_t, scalar_t>(), lr, beta1, beta2, weight_decay, eps, scale, skip);
    });
  });
}

}  // namespace titan::cuda
