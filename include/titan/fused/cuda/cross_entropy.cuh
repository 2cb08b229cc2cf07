#pragma once
// titan/fused/cuda/cross_entropy.cuh: the CUDA kernel of titan::cross_entropy_loss_and_grad (see
// titan/fused/cross_entropy.hpp for the formulas). One block per row of logits: an online softmax
// pass (running max and sum of exp, in fp32) and, for the gradient, a second pass writing
// (softmax - one_hot(target)) * grad_scale in the logits' dtype, both in 16-byte packs. The
// backward's rescaling by grad_output / grad_scale is a grid-stride kernel that returns at once
// when that factor is 1. Compiled by nvcc into titan::cuda_kernels; logits of other dtypes than
// fp32, fp16 and bf16 take the ATen implementation.
#include <titan/fused/cross_entropy.hpp>
#include <titan/fused/cuda/grid.cuh>
#include <titan/fused/cuda/inputs.cuh>
#include <titan/fused/cuda/pack.cuh>

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

/// max(a, b), NaN if either is (fmaxf drops a NaN: a row with one would get a finite loss).
__device__ __forceinline__ float nan_max(float a, float b) { return b > a || b != b ? b : a; }

/// The max of a pack's values and the sum of exp(value - max): one exp per value (combining it with
/// the row's running state takes two more per pack, not two per value).
template <typename scalar_t, int kWidth>
__device__ __forceinline__ MaxSum pack_max_sum(const Pack<scalar_t, kWidth>& p) {
  float max = -INFINITY;
  for (int j = 0; j < kWidth; ++j) max = nan_max(max, static_cast<float>(p.v[j]));
  if (max == -INFINITY) return {max, 0.f};  // every value -inf: nothing to add
  float sum = 0.f;
  for (int j = 0; j < kWidth; ++j) sum += expf(static_cast<float>(p.v[j]) - max);
  return {max, sum};
}

/// The elements of a row that precede its first 16-byte boundary (none without packs).
template <int kWidth, typename scalar_t>
__device__ __forceinline__ int64_t elements_before_pack_boundary(const scalar_t* row, int64_t vocab) {
  if (kWidth == 1) return 0;
  const auto before = static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16 / sizeof(scalar_t));
  return before < vocab ? before : vocab;
}

/// Row blockIdx.x of logits [rows, vocab]: row_loss[row] = lse - x[target] (0 when ignored) and,
/// when grad is not null, grad[row, :] = (softmax - one_hot(target)) * grad_scale (0 when ignored).
/// Each row in 16-byte packs of kWidth elements from its first 16-byte boundary, the elements before
/// and after one at a time (logits and grad start at 16-byte boundaries: their rows lie alike).
template <typename scalar_t, int kWidth>
__global__ void cross_entropy_rows(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                                   scalar_t* __restrict__ grad, float* __restrict__ row_loss, int64_t vocab,
                                   int64_t ignore_index, float grad_scale) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * vocab;  // [vocab]
  const int64_t head = elements_before_pack_boundary<kWidth>(x, vocab);  // [0, head): one at a time
  const int64_t packs = (vocab - head) / kWidth, tail = head + packs * kWidth;  // then packs to tail
  MaxSum state{-INFINITY, 0.f};
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) state = combine(state, {static_cast<float>(x[v]), 1.f});
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x)
    state = combine(state, pack_max_sum(load_pack<kWidth>(x + head + p * kWidth)));
  for (int64_t v = tail + threadIdx.x; v < vocab; v += blockDim.x)
    state = combine(state, {static_cast<float>(x[v]), 1.f});
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
  // softmax * grad_scale everywhere (0 in an ignored row); then thread 0 subtracts the target's 1.
  scalar_t* dx = grad + row * vocab;  // [vocab]
  const auto softmax = [&](scalar_t logit) {
    return static_cast<scalar_t>((kept ? expf(static_cast<float>(logit) - lse) : 0.f) * grad_scale);
  };
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) dx[v] = softmax(x[v]);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const int64_t first = head + p * kWidth;
    const auto in = load_pack<kWidth>(x + first);
    Pack<scalar_t, kWidth> out;
    for (int j = 0; j < kWidth; ++j) out.v[j] = softmax(in.v[j]);
    store_pack<kWidth>(dx + first, out);
  }
  for (int64_t v = tail + threadIdx.x; v < vocab; v += blockDim.x) dx[v] = softmax(x[v]);
  __syncthreads();  // every thread's writes before thread 0 rewrites the target's
  if (threadIdx.x == 0 && kept)
    dx[target] = static_cast<scalar_t>((expf(static_cast<float>(x[target]) - lse) - 1.f) * grad_scale);
}

/// grad[0, n) *= *grad_output / grad_scale (in fp32), unless that factor is exactly 1: then every
/// block returns before touching memory. In packs of kWidth elements, the last n % kWidth one at a
/// time.
template <typename scalar_t, int kWidth>
__global__ void rescale_unless_one(scalar_t* __restrict__ grad, const float* __restrict__ grad_output,
                                   float grad_scale, int64_t n) {
  const float factor = *grad_output / grad_scale;
  if (factor == 1.f) return;
  const int64_t whole = n / kWidth * kWidth;  // the elements of whole packs
  for (int64_t i = first_element<int64_t, kWidth>(); i < whole; i += element_stride<int64_t, kWidth>()) {
    auto p = load_pack<kWidth>(grad + i);
    for (int j = 0; j < kWidth; ++j) p.v[j] = static_cast<scalar_t>(static_cast<float>(p.v[j]) * factor);
    store_pack<kWidth>(grad + i, p);
  }
  for (int64_t i = whole + first_element<int64_t, 1>(); i < n; i += element_stride<int64_t, 1>())
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
    TITAN_DISPATCH_KERNEL_DTYPES(x.scalar_type(), "titan::cross_entropy", [&] {
      // Packs where the logits and grad start at 16-byte boundaries (grad, new, always does: the
      // loss alone takes the same path, the same bits); each row's start then lies as far from one
      // in both.
      const bool packed = detail::packable<scalar_t>({x.data_ptr(), compute_grad ? grad.data_ptr() : nullptr}, {});
      detail::with_pack_width<scalar_t>(packed, [&](auto width) {
        detail::launch(detail::cross_entropy_rows<scalar_t, width>, static_cast<unsigned>(rows),
                       detail::kCrossEntropyThreads, x.data_ptr<scalar_t>(), t.data_ptr<int64_t>(),
                       compute_grad ? grad.data_ptr<scalar_t>() : nullptr, row_loss.data_ptr<float>(), vocab,
                       ignore_index, static_cast<float>(grad_scale));
      });
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
  TITAN_DISPATCH_KERNEL_DTYPES(grad.scalar_type(), "titan::cross_entropy_rescale_grad_", [&] {
    detail::with_pack_width<scalar_t>(detail::packable<scalar_t>({grad.data_ptr()}, {}), [&](auto width) {
      detail::launch(detail::rescale_unless_one<scalar_t, width>, detail::grid_stride_blocks(n / width),
                     detail::kElementwiseThreads, grad.data_ptr<scalar_t>(), grad_output.data_ptr<float>(),
                     static_cast<float>(grad_scale), n);
    });
  });
}

}  // namespace titan::cuda
