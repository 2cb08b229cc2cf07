#pragma once
// titan/fused/cuda/rope.cuh: the CUDA kernels of titan::rope_forward and titan::rope_backward
// (see titan/fused/rope.hpp for the formulas): one pass over q and k together, a thread per
// element pair, in fp32, reading q and k in place when they are column slices of one tensor (the
// fused wq|wk|wv projection, titan::linear_fused). Compiled by nvcc into titan::cuda_kernels; fp64 takes the ATen
// implementation.
#include <titan/fused/cuda/grid.cuh>
#include <titan/fused/rope.hpp>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>
#include <type_traits>

namespace titan::cuda {
namespace detail {

/// Pair p of x [B, S, H, D/2 pairs] (each token's H x D elements contiguous, tokens `stride`
/// elements apart) rotated by +-theta of its position and frequency into out [B, S, H, D]
/// (contiguous): cos, sin [S, D/2] (x's dtype or fp32); sign -1 for the backward's rotation by -theta.
template <typename scalar_t, typename table_t>
__device__ inline void rope_pair(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                 const table_t* __restrict__ cos, const table_t* __restrict__ sin, int64_t p,
                                 int64_t heads, int64_t half, int64_t seq, int64_t stride, float sign) {
  const int64_t i = p % half, s = (p / (half * heads)) % seq;
  const float c = static_cast<float>(cos[s * half + i]), sn = sign * static_cast<float>(sin[s * half + i]);
  const int64_t offset = row_offset(2 * p, 2 * half * heads, stride);
  const float x0 = static_cast<float>(x[offset]), x1 = static_cast<float>(x[offset + 1]);
  out[2 * p] = static_cast<scalar_t>(x0 * c - x1 * sn);
  out[2 * p + 1] = static_cast<scalar_t>(x0 * sn + x1 * c);
}

/// The pairs of q (the first q_pairs indices of the grid-stride loop) and then of k.
template <typename scalar_t, typename table_t>
__global__ void rope_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                            scalar_t* __restrict__ q_out, scalar_t* __restrict__ k_out,
                            const table_t* __restrict__ cos, const table_t* __restrict__ sin, int64_t q_pairs,
                            int64_t k_pairs, int64_t q_heads, int64_t k_heads, int64_t half, int64_t seq,
                            int64_t q_stride, int64_t k_stride, float sign) {
  const int64_t total = q_pairs + k_pairs;
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < total; p += int64_t{blockDim.x} * gridDim.x) {
    if (p < q_pairs)
      rope_pair(q, q_out, cos, sin, p, q_heads, half, seq, q_stride, sign);
    else
      rope_pair(k, k_out, cos, sin, p - q_pairs, k_heads, half, seq, k_stride, sign);
  }
}

/// q and k rotated by +theta (sign 1) or -theta (sign -1). Tables in q's dtype (FSDP's cast of a
/// block's inputs) are read as they are, others as fp32.
inline std::tuple<at::Tensor, at::Tensor> rope_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                      const at::Tensor& sin, float sign) {
  const c10::cuda::CUDAGuard guard(q.device());
  const auto x_rows = rows_of(q, 2), y_rows = rows_of(k, 2);  // [B, S, H, D], tokens in strided rows
  const auto &x = x_rows.tensor, &y = y_rows.tensor;
  const bool native = cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type();
  const auto table = native ? x.scalar_type() : at::kFloat;
  const auto c = cos.to(table).contiguous(), s = sin.to(table).contiguous();  // [S, D/2]
  auto x_out = at::empty(x.sizes(), x.options()), y_out = at::empty(y.sizes(), y.options());  // [B, S, H, D]
  const int64_t q_pairs = x.numel() / 2, k_pairs = y.numel() / 2;
  if (q_pairs + k_pairs == 0) return {x_out, y_out};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "titan::rope", [&] {
    auto launch = [&](auto* cos_data, auto* sin_data) {
      using table_t = std::remove_const_t<std::remove_pointer_t<decltype(cos_data)>>;
      rope_kernel<scalar_t, table_t><<<grid_stride_blocks(q_pairs + k_pairs), kElementwiseThreads, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x_out.data_ptr<scalar_t>(), y_out.data_ptr<scalar_t>(),
          cos_data, sin_data, q_pairs, k_pairs, x.size(2), y.size(2), x.size(3) / 2, x.size(1), x_rows.stride,
          y_rows.stride, sign);
    };
    if (native)
      launch(c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>());
    else
      launch(c.data_ptr<float>(), s.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_out, y_out};
}

}  // namespace detail

/// titan::rope_forward on CUDA tensors.
inline std::tuple<at::Tensor, at::Tensor> rope_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                       const at::Tensor& sin) {
  titan::detail::check_rope_inputs(q, k, cos, sin);
  if (q.scalar_type() == at::kDouble) return titan::detail::rope_forward_aten(q, k, cos, sin);
  return detail::rope_launch(q, k, cos, sin, 1.f);
}

/// titan::rope_backward on CUDA tensors.
inline std::tuple<at::Tensor, at::Tensor> rope_backward(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                        const at::Tensor& cos, const at::Tensor& sin) {
  titan::detail::check_rope_inputs(grad_q, grad_k, cos, sin);
  if (grad_q.scalar_type() == at::kDouble) return titan::detail::rope_backward_aten(grad_q, grad_k, cos, sin);
  return detail::rope_launch(grad_q, grad_k, cos, sin, -1.f);
}

}  // namespace titan::cuda
