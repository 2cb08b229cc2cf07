#pragma once
// titan/fused/cuda/grid.cuh: the launch shape of titan's element-wise CUDA kernels (SwiGLU, RoPE,
// the cross entropy's rescaling):
// grid-stride loops of 256 threads per block, as many blocks as fill the GPU; inputs read in rows
// that may be strided (a column slice of a fused projection's output), so no copy makes them
// contiguous; index arithmetic in 32 bits wherever the indices fit, divisions by launch constants
// as a multiply and a shift (ATen's IntDivider), not the ~100 instructions of a 64-bit division.
#include <titan/fused/cuda/runtime.cuh>

#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace titan::cuda::detail {

/// Threads per block of the element-wise kernels.
inline constexpr int kElementwiseThreads = 256;

/// Blocks for `n` items of a grid-stride loop of kElementwiseThreads threads: enough to fill the
/// GPU (8 per multiprocessor), no more, and at least one.
inline unsigned grid_stride_blocks(int64_t n) {
  const int64_t resident = multiprocessors() * 8;
  const int64_t needed = (n + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(resident, needed)));
}

/// This thread's first element in a grid-stride loop over packs of kWidth elements.
template <typename index_t, int kWidth>
__device__ __forceinline__ index_t first_element() {
  return (blockIdx.x * index_t{blockDim.x} + threadIdx.x) * kWidth;
}

/// The elements between a thread's packs in a grid-stride loop over packs of kWidth elements.
template <typename index_t, int kWidth>
__device__ __forceinline__ index_t element_stride() {
  return index_t{blockDim.x} * gridDim.x * kWidth;
}

/// `x` as rows of its last `inner` dimensions: x itself when those are contiguous within a row and
/// the rows evenly spaced (a column slice of a wider tensor, e.g. q of a fused [q|k|v] projection:
/// no copy), else x.contiguous(); with the elements from one row's start to the next.
struct Rows {
  at::Tensor tensor;
  int64_t stride;
};
inline Rows rows_of(const at::Tensor& x, int64_t inner) {
  const int64_t n = x.dim();
  int64_t row_numel = 1;
  bool fits = inner <= n;
  for (int64_t d = n - 1; fits && d >= n - inner; --d) {
    fits = x.size(d) == 1 || x.stride(d) == row_numel;
    row_numel *= x.size(d);
  }
  int64_t stride = -1, step = 0;  // the innermost leading dimension of more than one row sets the stride
  for (int64_t d = n - inner - 1; fits && d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (stride < 0) stride = step = x.stride(d);
    fits = x.stride(d) == step;
    step *= x.size(d);
  }
  if (fits && stride < 0) return {x, row_numel};  // one row
  if (fits && stride >= row_numel) return {x, stride};
  return {x.contiguous(), row_numel};
}

/// Division by a launch constant in the kernel's index type: a multiply and a shift for uint32_t.
template <typename index_t>
using Divider = at::cuda::detail::IntDivider<index_t>;

/// A divider by `d` (at least 1: an empty tensor's zero-width rows divide nothing).
template <typename index_t>
Divider<index_t> divider(int64_t d) {
  return Divider<index_t>(static_cast<index_t>(std::max<int64_t>(d, 1)));
}

/// The elements a kernel may address in `n` elements read as rows of `cols` elements `stride` apart:
/// from the first row's start to the last row's end.
inline int64_t rows_extent(int64_t n, int64_t cols, int64_t stride) {
  const int64_t rows = n / std::max<int64_t>(cols, 1);
  return rows == 0 ? n : (rows - 1) * stride + cols;
}

/// Calls f(index_t{}) with the index type of a launch whose indices and offsets all lie below
/// `extent`: uint32_t where they fit in int32 (every tensor titan's trainers launch on, up to the
/// 8192 x 128,256 logits), else uint64_t.
template <typename F>
void with_index_type(int64_t extent, const F& f) {
  if (extent <= std::numeric_limits<int32_t>::max())
    f(uint32_t{});
  else
    f(uint64_t{});
}

}  // namespace titan::cuda::detail
