#pragma once
// titan/fused/cuda/swiglu.cuh: the CUDA kernels of titan::swiglu_forward and
// titan::swiglu_backward (see titan/fused/swiglu.hpp for the formulas): one element-wise pass
// each way, in fp32, reading gate and up in place when they are column slices of one tensor (the
// fused w1|w3 projection, titan::linear_fused). Compiled by nvcc into titan::cuda_kernels; fp64
// takes the ATen implementation.
#include <titan/fused/cuda/grid.cuh>
#include <titan/fused/swiglu.hpp>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

namespace titan::cuda {
namespace detail {

/// gate and up [rows, cols] in rows gate_stride and up_stride elements apart; out contiguous.
template <typename scalar_t>
__global__ void swiglu_forward_kernel(const scalar_t* __restrict__ gate, const scalar_t* __restrict__ up,
                                      scalar_t* __restrict__ out, int64_t n, int64_t cols, int64_t gate_stride,
                                      int64_t up_stride) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{blockDim.x} * gridDim.x) {
    const float a = static_cast<float>(gate[row_offset(i, cols, gate_stride)]);
    const float s = 1.f / (1.f + expf(-a));
    out[i] = static_cast<scalar_t>(a * s * static_cast<float>(up[row_offset(i, cols, up_stride)]));
  }
}

/// grad, d_gate and d_up contiguous; gate and up as in the forward.
template <typename scalar_t>
__global__ void swiglu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ gate,
                                       const scalar_t* __restrict__ up, scalar_t* __restrict__ d_gate,
                                       scalar_t* __restrict__ d_up, int64_t n, int64_t cols, int64_t gate_stride,
                                       int64_t up_stride) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{blockDim.x} * gridDim.x) {
    const float g = static_cast<float>(grad[i]), a = static_cast<float>(gate[row_offset(i, cols, gate_stride)]);
    const float s = 1.f / (1.f + expf(-a));
    d_gate[i] = static_cast<scalar_t>(g * static_cast<float>(up[row_offset(i, cols, up_stride)]) * s *
                                      (1.f + a * (1.f - s)));
    d_up[i] = static_cast<scalar_t>(g * a * s);
  }
}

}  // namespace detail

/// titan::swiglu_forward on CUDA tensors.
inline at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  if (gate.scalar_type() == at::kDouble) return titan::detail::swiglu_forward_aten(gate, up);
  titan::detail::check_swiglu_inputs(gate, up);
  const c10::cuda::CUDAGuard guard(gate.device());
  const auto a = detail::rows_of(gate, 1), b = detail::rows_of(up, 1);  // [..., cols] in strided rows
  auto out = at::empty(gate.sizes(), gate.options());                    // [..., cols]
  const int64_t n = out.numel();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "titan::swiglu_forward", [&] {
      detail::swiglu_forward_kernel<scalar_t>
          <<<detail::grid_stride_blocks(n), detail::kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              a.tensor.data_ptr<scalar_t>(), b.tensor.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
              gate.size(-1), a.stride, b.stride);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

/// titan::swiglu_backward on CUDA tensors.
inline std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                          const at::Tensor& up) {
  if (gate.scalar_type() == at::kDouble || grad.scalar_type() != gate.scalar_type())
    return titan::detail::swiglu_backward_aten(grad, gate, up);
  titan::detail::check_swiglu_grad(grad, gate, up);
  const c10::cuda::CUDAGuard guard(gate.device());
  const auto g = grad.contiguous();                                       // [..., cols]
  const auto a = detail::rows_of(gate, 1), b = detail::rows_of(up, 1);  // [..., cols] in strided rows
  auto d_gate = at::empty(gate.sizes(), gate.options()), d_up = at::empty(up.sizes(), up.options());  // [..., cols]
  const int64_t n = g.numel();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "titan::swiglu_backward", [&] {
      detail::swiglu_backward_kernel<scalar_t>
          <<<detail::grid_stride_blocks(n), detail::kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              g.data_ptr<scalar_t>(), a.tensor.data_ptr<scalar_t>(), b.tensor.data_ptr<scalar_t>(),
              d_gate.data_ptr<scalar_t>(), d_up.data_ptr<scalar_t>(), n, gate.size(-1), a.stride, b.stride);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {d_gate, d_up};
}

}  // namespace titan::cuda
