#pragma once
// titan/fused/cuda/float8_cast.cuh: the CUDA kernels of titan::float8_cast and
// titan::float8_cast_transpose (see titan/fused/float8_cast.hpp for the formula): one element-wise
// pass over hp's memory in any dense layout, and one through shared-memory tiles that writes
// row-major, column-major or both. The element-wise kernel casts a weight's transpose too;
// 16-byte packs of hp in, a pack of float8 out (8 bytes from bf16 or fp16, 4 from fp32); each
// thread computes its elements' scale from amax (once per run of elements that share it) exactly
// as the ATen implementation does: fp64 division and product, the fp32 product with hp, NaN
// propagating through the clamp, float8 rounding by c10's conversion. The element that starts
// each of amax's rows or columns writes its scale and the scale's inverse. Compiled by nvcc into
// titan::cuda_kernels; other inputs (fp64 hp, an amax that varies along more than one dimension,
// an overlapping or gapped hp, an empty one) take the ATen implementation.
#include <titan/fused/cuda/grid.cuh>
#include <titan/fused/cuda/inputs.cuh>
#include <titan/fused/cuda/pack.cuh>
#include <titan/fused/float8_cast.hpp>

#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace titan::cuda {
namespace detail {

/// float8_max / max(amax, 1e-12) in fp64, rounded to fp32, optionally 2^floor(log2(scale)): as
/// titan::detail::amax_to_scale computes it (clamp_min propagates NaN).
__device__ __forceinline__ float float8_scale(float amax, double float8_max, bool power_of_2) {
  double a = static_cast<double>(amax);
  a = a != a ? a : (a < 1e-12 ? 1e-12 : a);
  const float scale = static_cast<float>((1.0 / a) * float8_max);
  return power_of_2 ? exp2f(floorf(log2f(scale))) : scale;
}

/// saturate(x · scale) to fp8_t: the fp32 product clamped to ±float8_max (NaN stays NaN), then c10's
/// round-to-nearest-even conversion, as cast_with_scale's clamp and to(dtype).
template <typename fp8_t>
__device__ __forceinline__ fp8_t saturate_to_float8(float x, float scale, float float8_max) {
  float v = x * scale;
  v = v != v ? v : fminf(fmaxf(v, -float8_max), float8_max);
  return fp8_t(v);
}

/// Writes kWidth one-byte elements at `p` with one store of kWidth bytes (8 or 4; `p` aligned to
/// it), or one at a time.
template <int kWidth, typename T>
__device__ __forceinline__ void store_byte_pack(T* p, const Pack<T, kWidth>& pack) {
  static_assert(sizeof(T) == 1, "one-byte elements");
  if constexpr (kWidth == 8 || kWidth == 4) {
    using Word = std::conditional_t<kWidth == 8, uint64_t, uint32_t>;
    check_aligned(p, sizeof(Word));
    Word word;
    memcpy(&word, &pack, sizeof(word));
    *reinterpret_cast<Word*>(p) = word;
  } else {
    for (int j = 0; j < kWidth; ++j) p[j] = pack.v[j];
  }
}

/// amax's entries along its one dimension of more than one element, amax_step apart (one amax:
/// entry 0); fp32, or hp's dtype when amax_in_hp_dtype.
template <typename scalar_t, typename index_t>
struct AmaxEntries {
  const void* amax;
  bool amax_in_hp_dtype;
  index_t amax_step;

  __device__ __forceinline__ float at(index_t a) const {
    return amax_in_hp_dtype ? static_cast<float>(static_cast<const scalar_t*>(amax)[a * amax_step])
                            : static_cast<const float*>(amax)[a * amax_step];
  }
};

/// Where an element's amax is: element i of hp's memory has index (i / axis_stride) % axis_size
/// along amax's axis (one amax: axis_size 1).
template <typename scalar_t, typename index_t>
struct AmaxWalk : AmaxEntries<scalar_t, index_t> {
  Divider<index_t> axis_stride, axis_size;
};

/// hp and data: n elements in the same dense layout; scale_out and inverse_out: one fp32 per amax
/// entry.
template <typename scalar_t, typename fp8_t, typename index_t, int kWidth>
__global__ void float8_cast_kernel(const scalar_t* __restrict__ hp, fp8_t* __restrict__ data,
                                   float* __restrict__ scale_out, float* __restrict__ inverse_out, index_t n,
                                   AmaxWalk<scalar_t, index_t> walk, float float8_max, bool power_of_2) {
  index_t current = ~index_t{0};  // the amax index whose scale `scale` holds (none yet)
  float scale = 0.f;
  for (index_t i = first_element<index_t, kWidth>(); i < n; i += element_stride<index_t, kWidth>()) {
    const auto x = load_pack<kWidth>(hp + i);
    Pack<fp8_t, kWidth> y;
    for (int j = 0; j < kWidth; ++j) {
      const auto along = walk.axis_stride.divmod(i + j);
      const index_t a = walk.axis_size.divmod(along.div).mod;  // the element's amax index
      if (a != current) {
        scale = float8_scale(walk.at(a), float8_max, power_of_2);
        current = a;
      }
      y.v[j] = saturate_to_float8<fp8_t>(static_cast<float>(x.v[j]), scale, float8_max);
      if (along.mod == 0 && along.div == a) {  // the element that starts amax entry a
        scale_out[a] = scale;
        inverse_out[a] = 1.f / scale;  // IEEE division, as ATen's reciprocal
      }
    }
    store_byte_pack<kWidth>(data + i, y);
  }
}

/// The tiles of float8_cast_transpose_kernel: 32 x 32 elements, read and written by blocks of
/// 32 x 8 threads, each thread 4 elements of a tile.
inline constexpr int kTransposeTile = 32;
inline constexpr int kTransposeThreadRows = 8;

/// A 2-D hp as float8_cast_transpose_kernel walks it: element (r, c) at r * row_stride + c *
/// col_stride; `tiles` tiles, `tiles_across` of them along a row of tiles; read along its rows
/// (consecutive threads on consecutive columns) or, when rows_contiguous (column-major), along
/// its columns.
template <typename index_t>
struct TransposeShape {
  index_t rows, cols, row_stride, col_stride, tiles;
  Divider<index_t> tiles_across;
  bool rows_contiguous;
};

/// titan::float8_cast_transpose: hp cast as float8_cast_kernel casts it (the scale of element (r,
/// c) from amax's entry 0, r or c: amax_axis -1, 0 or 1), written row-major into `row_major` and
/// column-major into `column_major` (either may be null). Each tile is read along hp's
/// contiguous dimension into shared memory as float8 bits, then written from there along each
/// output's contiguous dimension: every global read and write coalesced, hp read once. The
/// element that starts each of amax's entries writes its scale and the scale's inverse.
template <typename scalar_t, typename fp8_t, typename index_t>
__global__ void float8_cast_transpose_kernel(const scalar_t* __restrict__ hp, TransposeShape<index_t> shape,
                                             uint8_t* __restrict__ row_major, uint8_t* __restrict__ column_major,
                                             float* __restrict__ scale_out, float* __restrict__ inverse_out,
                                             AmaxEntries<scalar_t, index_t> amax, int amax_axis, float float8_max,
                                             bool power_of_2) {
  __shared__ uint8_t tile[kTransposeTile][kTransposeTile + 1];  // [r - r0][c - c0]: float8 bits
  const index_t tx = threadIdx.x, ty = threadIdx.y;
  index_t current = ~index_t{0};  // the amax entry whose scale `scale` holds (none yet)
  float scale = 0.f;
  for (index_t t = blockIdx.x; t < shape.tiles; t += gridDim.x) {
    const auto tile_at = shape.tiles_across.divmod(t);
    const index_t r0 = tile_at.div * kTransposeTile, c0 = tile_at.mod * kTransposeTile;
    for (index_t k = 0; k < kTransposeTile; k += kTransposeThreadRows) {
      const index_t i = shape.rows_contiguous ? tx : ty + k, j = shape.rows_contiguous ? ty + k : tx;  // in the tile
      const index_t r = r0 + i, c = c0 + j;
      if (r >= shape.rows || c >= shape.cols) continue;
      const index_t a = amax_axis == 0 ? r : amax_axis == 1 ? c : 0;  // the element's amax entry
      if (a != current) {
        scale = float8_scale(amax.at(a), float8_max, power_of_2);
        current = a;
      }
      const float x = static_cast<float>(hp[r * shape.row_stride + c * shape.col_stride]);
      tile[i][j] = saturate_to_float8<fp8_t>(x, scale, float8_max).x;
      if ((amax_axis == 0 ? c : amax_axis == 1 ? r : r + c) == 0) {  // the element that starts entry a
        scale_out[a] = scale;
        inverse_out[a] = 1.f / scale;  // IEEE division, as ATen's reciprocal
      }
    }
    __syncthreads();
    for (index_t k = 0; k < kTransposeTile; k += kTransposeThreadRows) {
      if (row_major != nullptr && r0 + ty + k < shape.rows && c0 + tx < shape.cols)  // along a row
        row_major[(r0 + ty + k) * shape.cols + c0 + tx] = tile[ty + k][tx];
      if (column_major != nullptr && r0 + tx < shape.rows && c0 + ty + k < shape.cols)  // along a column
        column_major[(c0 + ty + k) * shape.rows + r0 + tx] = tile[tx][ty + k];
    }
    __syncthreads();  // the tile is read before the next one overwrites it
  }
}

/// The one dimension along which amax has more than one element (-1: one element in all), or -2
/// when it varies along several.
inline int64_t amax_axis(const at::Tensor& amax) {
  if (amax.numel() == 1) return -1;
  int64_t axis = -1;
  for (int64_t d = 0; d < amax.dim(); ++d)
    if (amax.size(d) > 1) axis = axis == -1 ? d : -2;
  return axis;
}

}  // namespace detail

/// titan::float8_cast on CUDA tensors.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> float8_cast(const at::Tensor& hp, const at::Tensor& amax,
                                                                  at::ScalarType dtype, bool power_of_2) {
  const bool float8 = dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2;
  const bool amax_dtype = amax.scalar_type() == at::kFloat || amax.scalar_type() == hp.scalar_type();
  if (!detail::kernel_dtype(hp.scalar_type()) || !float8 || !amax_dtype || hp.numel() == 0 ||
      !hp.is_non_overlapping_and_dense() || !detail::on_device(hp.device(), {&amax}))
    return titan::detail::float8_cast_aten(hp, amax, dtype, power_of_2);
  titan::detail::check_float8_cast(hp, amax, dtype);
  const int64_t axis = detail::amax_axis(amax);
  if (axis == -2) return titan::detail::float8_cast_aten(hp, amax, dtype, power_of_2);
  const detail::DeviceGuard guard(hp.device());
  const int64_t n = hp.numel();
  // Element i of hp's memory lies at index (i / stride) % size along amax's axis.
  const int64_t axis_stride = axis >= 0 ? hp.stride(axis) : n, axis_size = axis >= 0 ? hp.size(axis) : 1;
  const int64_t amax_step = axis >= 0 ? amax.stride(axis) : 0;
  auto data = at::empty_strided(hp.sizes(), hp.strides(), hp.options().dtype(dtype));  // hp's layout
  auto scale = at::empty(amax.sizes(), amax.options().dtype(at::kFloat));            // amax's shape
  auto inverse = at::empty_like(scale);
  const double max = titan::detail::float8_max(dtype);
  TITAN_DISPATCH_KERNEL_DTYPES(hp.scalar_type(), "titan::float8_cast", [&] {
    const bool packed = detail::packable<scalar_t>({hp.data_ptr(), data.data_ptr()}, {n});
    detail::with_pack_width<scalar_t>(packed, [&](auto width) {
      detail::with_index_type(std::max(n, amax.numel() * std::max<int64_t>(amax_step, 1)), [&](auto index) {
        using index_t = decltype(index);
        const detail::AmaxWalk<scalar_t, index_t> walk{
            {amax.data_ptr(), amax.scalar_type() != at::kFloat, static_cast<index_t>(amax_step)},
            detail::divider<index_t>(axis_stride),
            detail::divider<index_t>(axis_size)};
        const auto launch = [&](auto* out) {
          using fp8_t = std::remove_pointer_t<decltype(out)>;
          detail::launch(detail::float8_cast_kernel<scalar_t, fp8_t, index_t, width>,
                         detail::grid_stride_blocks(n / width), detail::kElementwiseThreads,
                         hp.data_ptr<scalar_t>(), out, scale.data_ptr<float>(), inverse.data_ptr<float>(),
                         static_cast<index_t>(n), walk, static_cast<float>(max), power_of_2);
        };
        if (dtype == at::kFloat8_e4m3fn)
          launch(data.data_ptr<c10::Float8_e4m3fn>());
        else
          launch(data.data_ptr<c10::Float8_e5m2>());
      });
    });
  });
  return {data, scale, inverse};
}

/// titan::float8_cast_transpose on CUDA tensors: titan::float8_cast's element-wise kernel when the
/// one layout asked for is hp's own, else the tiled kernel; the inputs titan::float8_cast's kernel
/// does not take and an amax of more than one element along both dimensions take the ATen
/// implementation. hp may have any strides (it is only read).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> float8_cast_transpose(
    const at::Tensor& hp, const at::Tensor& amax, at::ScalarType dtype, bool power_of_2, bool row_major,
    bool column_major) {
  titan::detail::check_float8_cast_transpose(hp, row_major, column_major);
  const bool float8 = dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2;
  const bool amax_dtype = amax.scalar_type() == at::kFloat || amax.scalar_type() == hp.scalar_type();
  if (!detail::kernel_dtype(hp.scalar_type()) || !float8 || !amax_dtype || hp.numel() == 0 ||
      !detail::on_device(hp.device(), {&amax}))
    return titan::detail::float8_cast_transpose_aten(hp, amax, dtype, power_of_2, row_major, column_major);
  titan::detail::check_float8_cast(hp, amax, dtype);
  if (row_major != column_major && (row_major ? hp.is_contiguous() : hp.t().is_contiguous())) {
    auto [data, scale, inverse] = float8_cast(hp, amax, dtype, power_of_2);  // hp's layout: the one asked for
    return {row_major ? data : at::Tensor(), column_major ? data : at::Tensor(), scale, inverse};
  }
  const int64_t axis = detail::amax_axis(amax);
  const int64_t rows = hp.size(0), cols = hp.size(1);
  const int64_t row_stride = hp.stride(0), col_stride = hp.stride(1);
  if (axis == -2) return titan::detail::float8_cast_transpose_aten(hp, amax, dtype, power_of_2, row_major, column_major);
  const detail::DeviceGuard guard(hp.device());
  const auto options = hp.options().dtype(dtype);
  auto rows_out = row_major ? at::empty({rows, cols}, options) : at::Tensor();             // [rows, cols]
  auto columns_out = column_major ? at::empty({cols, rows}, options).t() : at::Tensor();  // [rows, cols], strides [1, rows]
  auto scale = at::empty(amax.sizes(), amax.options().dtype(at::kFloat));               // amax's shape
  auto inverse = at::empty_like(scale);
  const int64_t amax_step = axis >= 0 ? amax.stride(axis) : 0;
  const int64_t tiles_down = (rows + detail::kTransposeTile - 1) / detail::kTransposeTile;
  const int64_t tiles_across = (cols + detail::kTransposeTile - 1) / detail::kTransposeTile;
  const int64_t hp_extent = (rows - 1) * row_stride + (cols - 1) * col_stride + 1;
  const auto bytes = [](const at::Tensor& t) { return t.defined() ? static_cast<uint8_t*>(t.data_ptr()) : nullptr; };
  TITAN_DISPATCH_KERNEL_DTYPES(hp.scalar_type(), "titan::float8_cast_transpose", [&] {
    const int64_t extent = std::max({hp_extent, rows * cols, amax.numel() * std::max<int64_t>(amax_step, 1)});
    detail::with_index_type(extent, [&](auto index) {
      using index_t = decltype(index);
      const detail::TransposeShape<index_t> shape{static_cast<index_t>(rows),
                                                  static_cast<index_t>(cols),
                                                  static_cast<index_t>(row_stride),
                                                  static_cast<index_t>(col_stride),
                                                  static_cast<index_t>(tiles_down * tiles_across),
                                                  detail::divider<index_t>(tiles_across),
                                                  row_stride < col_stride};
      const detail::AmaxEntries<scalar_t, index_t> entries{amax.data_ptr(), amax.scalar_type() != at::kFloat,
                                                           static_cast<index_t>(amax_step)};
      const auto kernel = dtype == at::kFloat8_e4m3fn
                              ? detail::float8_cast_transpose_kernel<scalar_t, c10::Float8_e4m3fn, index_t>
                              : detail::float8_cast_transpose_kernel<scalar_t, c10::Float8_e5m2, index_t>;
      const int64_t blocks = std::min<int64_t>(tiles_down * tiles_across, detail::multiprocessors() * 8);
      detail::launch(kernel, static_cast<unsigned>(blocks), dim3(detail::kTransposeTile, detail::kTransposeThreadRows),
                     hp.data_ptr<scalar_t>(), shape, bytes(rows_out), bytes(columns_out), scale.data_ptr<float>(),
                     inverse.data_ptr<float>(), entries, static_cast<int>(axis),
                     static_cast<float>(titan::detail::float8_max(dtype)), power_of_2);
    });
  });
  return {rows_out, columns_out, scale, inverse};
}

}  // namespace titan::cuda
