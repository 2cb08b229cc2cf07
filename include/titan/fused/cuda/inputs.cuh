#pragma once
// titan/fused/cuda/inputs.cuh: which inputs titan's CUDA kernels take. The kernels compute in fp32
// from fp32, fp16 or bf16 tensors on one device; any other input (fp64, float8, a tensor on another
// device, a shape a kernel would not read as it expects) takes the operator's ATen implementation,
// which computes it or names what is wrong, as on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <initializer_list>

namespace titan::cuda::detail {

/// Whether the kernels compute from tensors of `dtype`: fp32, fp16 or bf16.
inline bool kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

/// AT_DISPATCH over the dtypes of kernel_dtype (fp32, fp16, bf16): scalar_t in the lambda.
#define TITAN_DISPATCH_KERNEL_DTYPES(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

/// Whether every defined tensor of `tensors` is on `device`.
inline bool on_device(c10::Device device, std::initializer_list<const at::Tensor*> tensors) {
  for (const auto* t : tensors)
    if (t->defined() && t->device() != device) return false;
  return true;
}

}  // namespace titan::cuda::detail
