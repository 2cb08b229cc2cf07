#pragma once
// titan/fused/cuda/rows.cuh: the launch shape of titan's row kernels (add_rms_norm, the MoE
// combine): one block per row, one 16-byte pack (or element) per thread in whole warps, a block's
// threads looping over rows wider than kRowThreads packs, and the row's sum reduced in the block.
#include <titan/fused/cuda/runtime.cuh>

#include <algorithm>
#include <cstdint>

namespace titan::cuda::detail {

inline constexpr int kRowThreads = 512;  // threads per row, at most

/// Threads for a row of `dim` elements taken `width` at a time: one pack (or element) each, in
/// whole warps, at most kRowThreads (a row of 2048 bf16 takes 256: no idle half-block).
inline unsigned row_threads(int64_t dim, int width) {
  const int64_t items = (dim + width - 1) / width;
  return static_cast<unsigned>(std::clamp<int64_t>((items + 31) / 32 * 32, 32, kRowThreads));
}

/// The sum of `value` over the block's threads, in every thread (blockDim.x a multiple of 32, at
/// most kRowThreads; every thread of the block calls it).
__device__ inline float block_sum(float value) {
  __shared__ float warps[kRowThreads / 32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float all = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) all += warps[w];
    total = all;
  }
  __syncthreads();
  return total;
}

}  // namespace titan::cuda::detail
