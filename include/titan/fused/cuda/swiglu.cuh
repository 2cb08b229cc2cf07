#pragma once
// titan/fused/cuda/swiglu.cuh: the CUDA kernels of titan::swiglu_forward and
// titan::swiglu_backward (see titan/fused/swiglu.hpp for the formulas): one element-wise pass
// each way, in fp32, reading gate and up in place when they are column slices of one tensor (the
// fused w1|w3 projection, titan::linear_fused). Compiled by nvcc into titan::cuda_kernels; other
// dtypes than fp32, fp16 and bf16 take the ATen implementation.
#include <titan/fused/cuda/grid.cuh>
#include <titan/fused/cuda/inputs.cuh>
#include <titan/fused/swiglu.hpp>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <tuple>

namespace titan::cuda {
namespace detail {

/// gate and up [rows, cols] in rows gate_stride and up_stride elements apart; out contiguous.
template <typename scalar_t, typename index_t>
__global__ void swiglu_forward_kernel(const scalar_t* __restrict__ gate, const scalar_t* __restrict__ up,
                                      scalar_t* __restrict__ out, index_t n, Divider<index_t> cols,
                                      index_t gate_stride, index_t up_stride) {
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < n; i += index_t{blockDim.x} * gridDim.x) {
    const auto rc = cols.divmod(i);  // row and column of element i
    const float a = static_cast<float>(gate[rc.div * gate_stride + rc.mod]);
    const float s = 1.f / (1.f + expf(-a));
    out[i] = static_cast<scalar_t>(a * s * static_cast<float>(up[rc.div * up_stride + rc.mod]));
  }
}

/// grad, d_gate and d_up contiguous; gate and up as in the forward.
template <typename scalar_t, typename index_t>
__global__ void swiglu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ gate,
                                       const scalar_t* __restrict__ up, scalar_t* __restrict__ d_gate,
                                       scalar_t* __restrict__ d_up, index_t n, Divider<index_t> cols,
                                       index_t gate_stride, index_t up_stride) {
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < n; i += index_t{blockDim.x} * gridDim.x) {
    const auto rc = cols.divmod(i);  // row and column of element i
    const float g = static_cast<float>(grad[i]), a = static_cast<float>(gate[rc.div * gate_stride + rc.mod]);
    const float s = 1.f / (1.f + expf(-a));
    d_gate[i] = static_cast<scalar_t>(g * static_cast<float>(up[rc.div * up_stride + rc.mod]) * s *
                                      (1.f + a * (1.f - s)));
    d_up[i] = static_cast<scalar_t>(g * a * s);
  }
}

/// The width of gate's rows (1 for a 0-dim gate), and the elements the kernels may address in
/// gate's and up's rows `a` and `b`.
struct SwiGluWalk {
  int64_t cols, extent;
};
inline SwiGluWalk swiglu_walk(const at::Tensor& gate, const Rows& a, const Rows& b) {
  const int64_t cols = gate.dim() == 0 ? 1 : gate.size(-1), n = gate.numel();
  return {cols, std::max({n, rows_extent(n, cols, a.stride), rows_extent(n, cols, b.stride)})};
}

}  // namespace detail

/// titan::swiglu_forward on CUDA tensors.
inline at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  if (!detail::kernel_dtype(gate.scalar_type())) return titan::detail::swiglu_forward_aten(gate, up);
  titan::detail::check_swiglu_inputs(gate, up);
  const detail::DeviceGuard guard(gate.device());
  const auto a = detail::rows_of(gate, 1), b = detail::rows_of(up, 1);  // [..., cols] in strided rows
  auto out = at::empty(gate.sizes(), gate.options());                    // [..., cols]
  const int64_t n = out.numel();
  const auto walk = detail::swiglu_walk(gate, a, b);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "titan::swiglu_forward", [&] {
      detail::with_index_type(walk.extent, [&](auto index) {
        using index_t = decltype(index);
        detail::launch(detail::swiglu_forward_kernel<scalar_t, index_t>, detail::grid_stride_blocks(n),
                       detail::kElementwiseThreads, a.tensor.data_ptr<scalar_t>(), b.tensor.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), n, detail::divider<index_t>(walk.cols), a.stride, b.stride);
      });
    });
  }
  return out;
}

/// titan::swiglu_backward on CUDA tensors.
inline std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                          const at::Tensor& up) {
  if (!detail::kernel_dtype(gate.scalar_type()) || grad.scalar_type() != gate.scalar_type() ||
      !detail::on_device(gate.device(), {&grad}))
    return titan::detail::swiglu_backward_aten(grad, gate, up);
  titan::detail::check_swiglu_grad(grad, gate, up);
  const detail::DeviceGuard guard(gate.device());
  const auto g = grad.contiguous();                                       // [..., cols]
  const auto a = detail::rows_of(gate, 1), b = detail::rows_of(up, 1);  // [..., cols] in strided rows
  auto d_gate = at::empty(gate.sizes(), gate.options()), d_up = at::empty(up.sizes(), up.options());  // [..., cols]
  const int64_t n = g.numel();
  const auto walk = detail::swiglu_walk(gate, a, b);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "titan::swiglu_backward", [&] {
      detail::with_index_type(walk.extent, [&](auto index) {
        using index_t = decltype(index);
        detail::launch(detail::swiglu_backward_kernel<scalar_t, index_t>, detail::grid_stride_blocks(n),
                       detail::kElementwiseThreads, g.data_ptr<scalar_t>(), a.tensor.data_ptr<scalar_t>(),
                       b.tensor.data_ptr<scalar_t>(), d_gate.data_ptr<scalar_t>(), d_up.data_ptr<scalar_t>(), n,
                       detail::divider<index_t>(walk.cols), a.stride, b.stride);
      });
    });
  }
  return {d_gate, d_up};
}

}  // namespace titan::cuda
