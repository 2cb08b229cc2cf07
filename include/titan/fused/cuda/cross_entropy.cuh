#pragma once
// titan/fused/cuda/cross_entropy.cuh: the CUDA kernel of titan::cross_entropy_loss_and_grad (see
// titan/fused/cross_entropy.hpp for the formulas). One block per row of logits: an online softmax
// pass (running max and sum of exp, in fp32) and, for the gradient, a second pass writing
// (softmax - one_hot(target)) * grad_scale in the logits' dtype. The backward's rescaling by
// grad_output / grad_scale is a grid-stride kernel that returns at once when that factor is 1.
// Compiled by nvcc into titan::cuda_kernels; logits of other dtypes than fp32, fp16 and bf16 take
// the ATen implementation.
#include <titan/fused/cross_entropy.hpp>
#include <titan/fused/cuda/grid.cuh>
#include <titan/fused/cuda/inputs.cuh>

#include <ATen/Dispatch.h>

#include <cmath>
#include <tuple>

namespace titan::cuda {
namespace detail {

inline constexpr int kCrossEntropyThreads = 512;

/// A row's running max and sum of exp(x - max).
struct MaxSum {
  float max;
  float sum;
};

__device__ inline MaxSum combine(MaxSum a, MaxSum b) {
  if (a.max == -INFINITY) return b;  // exp(-inf - -inf) would be NaN
  if (b.max == -INFINITY) return a;
  const float max = fmaxf(a.max, b.max);
  return {max, a.sum * expf(a.max - max) + b.sum * expf(b.max - max)};
}

/// Row blockIdx.x of logits [rows, vocab]: row_loss[row] = lse - x[target] (0 when ignored) and,
/// when grad is not null, grad[row, :] = (softmax - one_hot(target)) * grad_scale (0 when ignored).
template <typename scalar_t>
__global__ void cross_entropy_rows(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                                   scalar_t* __restrict__ grad, float* __restrict__ row_loss, int64_t vocab,
                                   int64_t ignore_index, float grad_scale) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * vocab;  // [vocab]
  MaxSum state{-INFINITY, 0.f};
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) state = combine(state, {static_cast<float>(x[v]), 1.f});
  for (int offset = 16; offset > 0; offset /= 2)
    state = combine(state, {__shfl_down_sync(0xffffffffu, state.max, offset),
                            __shfl_down_sync(0xffffffffu, state.sum, offset)});
  __shared__ MaxSum warps[kCrossEntropyThreads / 32];
  __shared__ float row_lse;
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = state;
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum total = warps[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) total = combine(total, warps[w]);
    row_lse = total.max + logf(total.sum);
  }
  __syncthreads();
  const float lse = row_lse;
  const int64_t target = targets[row];
  const bool kept = target != ignore_index;
  CUDA_KERNEL_ASSERT(!kept || (target >= 0 && target < vocab));
  if (threadIdx.x == 0) row_loss[row] = kept ? lse - static_cast<float>(x[target]) : 0.f;
  if (grad == nullptr) return;
  scalar_t* dx = grad + row * vocab;  // [vocab]
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float value = kept ? expf(static_cast<float>(x[v]) - lse) - (v == target ? 1.f : 0.f) : 0.f;
    dx[v] = static_cast<scalar_t>(value * grad_scale);
  }
}

/// grad[0, n) *= *grad_output / grad_scale (in fp32), unless that factor is exactly 1: then every
/// block returns before touching memory.
template <typename scalar_t>
__global__ void rescale_unless_one(scalar_t* __restrict__ grad, const float* __restrict__ grad_output,
                                   float grad_scale, int64_t n) {
  const float factor = *grad_output / grad_scale;
  if (factor == 1.f) return;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    grad[i] = static_cast<scalar_t>(static_cast<float>(grad[i]) * factor);
}

}  // namespace detail

/// titan::cross_entropy_loss_and_grad on CUDA tensors (same contract as the ATen implementation).
inline std::tuple<at::Tensor, at::Tensor> cross_entropy_loss_and_grad(const at::Tensor& logits,
                                                                      const at::Tensor& targets, int64_t ignore_index,
                                                                      int64_t chunk_elements, bool compute_grad,
                                                                      double grad_scale) {
  if (!detail::kernel_dtype(logits.scalar_type()))
    return titan::detail::cross_entropy_loss_and_grad_aten(logits, targets, ignore_index, chunk_elements, compute_grad,
                                                           grad_scale);
  titan::detail::check_cross_entropy_rows(logits, targets, "titan::cross_entropy");
  const detail::DeviceGuard guard(logits.device());
  const auto x = logits.contiguous();   // [N, V]
  const auto t = targets.contiguous();  // [N]
  const int64_t rows = x.size(0), vocab = x.size(1);
  auto row_loss = at::empty({rows}, x.options().dtype(at::kFloat));                              // [N]
  auto grad = compute_grad ? at::empty({rows, vocab}, x.options()) : at::empty({0}, x.options());  // [N, V]
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "titan::cross_entropy", [&] {
      detail::launch(detail::cross_entropy_rows<scalar_t>, static_cast<unsigned>(rows), detail::kCrossEntropyThreads,
                     x.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), compute_grad ? grad.data_ptr<scalar_t>() : nullptr,
                     row_loss.data_ptr<float>(), vocab, ignore_index, static_cast<float>(grad_scale));
    });
  }
  return {row_loss.sum(), grad};  // [], [N, V]
}

/// titan::cross_entropy_rescale_grad_ on CUDA tensors: the ATen implementation's contract, the
/// factor tested on the device (no sync). Other gradients than contiguous fp32, fp16 or bf16 ones
/// with an fp32 grad_output of one element on their device take the ATen path.
inline void cross_entropy_rescale_grad_(at::Tensor& grad, const at::Tensor& grad_output, double grad_scale) {
  if (!detail::kernel_dtype(grad.scalar_type()) || grad_output.scalar_type() != at::kFloat || !grad.is_contiguous() ||
      grad_output.numel() != 1 || !detail::on_device(grad.device(), {&grad_output}))
    return titan::detail::cross_entropy_rescale_grad_aten(grad, grad_output, grad_scale);
  const detail::DeviceGuard guard(grad.device());
  const int64_t n = grad.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "titan::cross_entropy_rescale_grad_",
                                  [&] {
                                    detail::launch(detail::rescale_unless_one<scalar_t>,
                                                   detail::grid_stride_blocks(n), detail::kElementwiseThreads,
                                                   grad.data_ptr<scalar_t>(), grad_output.data_ptr<float>(),
                                                   static_cast<float>(grad_scale), n);
                                  });
}

}  // namespace titan::cuda
