#pragma once
// titan/fused/cuda/grid.cuh: the launch shape of titan's element-wise CUDA kernels (SwiGLU, RoPE,
// the cross entropy's rescaling):
// grid-stride loops of 256 threads per block, as many blocks as fill the GPU.
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace titan::cuda::detail {

/// Threads per block of the element-wise kernels.
inline constexpr int kElementwiseThreads = 256;

/// Blocks for `n` items of a grid-stride loop of kElementwiseThreads threads: enough to fill the
/// GPU (8 per multiprocessor), no more, and at least one.
inline unsigned grid_stride_blocks(int64_t n) {
  const int64_t resident = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 8;
  const int64_t needed = (n + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(resident, needed)));
}

}  // namespace titan::cuda::detail
