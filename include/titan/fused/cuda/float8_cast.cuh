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

/// The scale and its inverse of each of amax's n entries, as float8_cast_kernel computes them (an
/// axiswise float8_cast_transpose_kernel reads them).
template <typename scalar_t, typename index_t>
__global__ void float8_scales_kernel(AmaxEntries<scalar_t, index_t> amax, index_t n, float* __restrict__ scale_out,
                                     float* __restrict__ inverse_out, float float8_max, bool power_of_2) {
  for (index_t a = first_element<index_t, 1>(); a < n; a += element_stride<index_t, 1>()) {
    const float scale = float8_scale(amax.at(a), float8_max, power_of_2);
    scale_out[a] = scale;
    inverse_out[a] = 1.f / scale;  // IEEE division, as ATen's reciprocal
  }
}

/// float8_cast_transpose_kernel's tiles: 64 x 64 elements of the rows it reads, by blocks of 256
/// threads. Each thread takes chunks of 8 consecutive elements: along a row when reading (one or
/// two 16-byte loads) and writing the rows' own layout, along a column of the tile when writing
/// the transposed one (8 bytes a store either way), 8 threads to a row or column of the tile.
inline constexpr int kTransposeTile = 64;
inline constexpr int kTransposeThreads = 256;
inline constexpr int kTransposeChunk = 8;
inline constexpr int kTransposeLines = kTransposeThreads / (kTransposeTile / kTransposeChunk);  // 32 a pass

/// What float8_cast_transpose_kernel reads: [rows, cols] with row i at i * stride and its elements
/// consecutive (hp, or hp's transpose when hp is column-major); `tiles` tiles, `tiles_across` of
/// them along a row of tiles.
template <typename index_t>
struct TransposeShape {
  index_t rows, cols, stride, tiles;
  Divider<index_t> tiles_across;
};

/// titan::float8_cast_transpose: the rows of `shape` cast as float8_cast_kernel casts (the scale
/// of element (r, c) from amax's entry 0, r or c: amax_axis -1, 0 or 1), written in the rows'
/// layout into `same` ([rows, cols] row-major) and transposed into `transposed` ([cols, rows]
/// row-major); either may be null. Each tile is read along its rows (the same layout written from
/// the registers) into shared memory as float8 bytes, and written transposed from there: every
/// global read and write coalesced, hp read once. kWidth: elements a load (kPackWidth: 16 bytes;
/// rows, cols and stride multiples of 8 and hp 16-byte aligned), or 1, element by element, each
/// checked against the bounds. The scales: one amax's computed by every thread once (block 0
/// writes it and its inverse), an axiswise amax's read from scale_out, which float8_scales_kernel
/// wrote before, into shared memory for each tile's rows or columns.
template <typename scalar_t, typename fp8_t, typename index_t, int kWidth>
__global__ void __launch_bounds__(kTransposeThreads)
    float8_cast_transpose_kernel(const scalar_t* __restrict__ src, TransposeShape<index_t> shape,
                                 uint8_t* __restrict__ same, uint8_t* __restrict__ transposed,
                                 float* __restrict__ scale_out, float* __restrict__ inverse_out,
                                 AmaxEntries<scalar_t, index_t> amax, int amax_axis, float float8_max,
                                 bool power_of_2) {
  // [i][j]: the float8 bits of the tile's element (i, j); 65 bytes a row, so that the 8 threads
  // gathering one column's chunks read 8 different banks.
  __shared__ uint8_t tile[kTransposeTile][kTransposeTile + 1];
  __shared__ float line_scale[kTransposeTile];  // axiswise: the scale of each of the tile's rows or columns
  constexpr bool kPacked = kWidth > 1;
  const int chunk = static_cast<int>(threadIdx.x % (kTransposeTile / kTransposeChunk)) * kTransposeChunk;
  const int first_line = static_cast<int>(threadIdx.x / (kTransposeTile / kTransposeChunk));
  // One amax: its scale, computed by every thread (once, outside the loop: the fp64 division's
  // slow path is a call, which inside the loop would spill the loop's registers around it).
  const float tensor_scale = amax_axis < 0 ? float8_scale(amax.at(0), float8_max, power_of_2) : 0.f;
  if (amax_axis < 0 && blockIdx.x == 0 && threadIdx.x == 0) {
    scale_out[0] = tensor_scale;
    inverse_out[0] = 1.f / tensor_scale;  // IEEE division, as ATen's reciprocal
  }
  for (index_t t = blockIdx.x; t < shape.tiles; t += gridDim.x) {
    const auto tile_at = shape.tiles_across.divmod(t);
    const index_t r0 = tile_at.div * kTransposeTile, c0 = tile_at.mod * kTransposeTile;
    if (amax_axis >= 0 && threadIdx.x < kTransposeTile) {  // the scales of the tile's rows (axis 0) or columns
      const index_t line = (amax_axis == 0 ? r0 : c0) + threadIdx.x;
      if (line < (amax_axis == 0 ? shape.rows : shape.cols)) line_scale[threadIdx.x] = scale_out[line];
    }
    __syncthreads();
    for (int i = first_line; i < kTransposeTile; i += kTransposeLines) {  // rows: read, cast, same layout
      const index_t r = r0 + i, c = c0 + chunk;
      if (r >= shape.rows || c >= shape.cols) continue;  // packed: the whole chunk is in (cols % 8 == 0)
      Pack<uint8_t, kTransposeChunk> bytes;
      for (int p = 0; p < kTransposeChunk; p += kWidth) {
        if (!kPacked && c + p >= shape.cols) break;
        const auto x = load_pack<kWidth>(src + r * shape.stride + c + p);
        for (int e = 0; e < kWidth; ++e) {
          const float scale = amax_axis < 0 ? tensor_scale : line_scale[amax_axis == 0 ? i : chunk + p + e];
          bytes.v[p + e] = saturate_to_float8<fp8_t>(static_cast<float>(x.v[e]), scale, float8_max).x;
          tile[i][chunk + p + e] = bytes.v[p + e];
        }
      }
      if (same == nullptr) continue;
      if (kPacked) {
        store_byte_pack<kTransposeChunk>(same + r * shape.cols + c, bytes);
      } else {
        for (int e = 0; e < kTransposeChunk && c + e < shape.cols; ++e) same[r * shape.cols + c + e] = bytes.v[e];
      }
    }
    __syncthreads();
    for (int j = first_line; transposed != nullptr && j < kTransposeTile; j += kTransposeLines) {  // columns
      const index_t c = c0 + j, r = r0 + chunk;
      if (c >= shape.cols || r >= shape.rows) continue;  // packed: the whole chunk is in (rows % 8 == 0)
      Pack<uint8_t, kTransposeChunk> bytes;
      for (int e = 0; e < kTransposeChunk; ++e) bytes.v[e] = tile[chunk + e][j];
      if (kPacked) {
        store_byte_pack<kTransposeChunk>(transposed + c * shape.rows + r, bytes);
      } else {
        for (int e = 0; e < kTransposeChunk && r + e < shape.rows; ++e) transposed[c * shape.rows + r + e] = bytes.v[e];
      }
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

/// Whether the cast kernels take hp and amax: hp fp32, fp16 or bf16 and not empty, a float8 target
/// dtype, amax fp32 or hp's dtype, on hp's device, of more than one element along one dimension at
/// most. Other inputs take the ATen implementation (which names what is wrong with them, if anything).
inline bool cast_kernels_take(const at::Tensor& hp, const at::Tensor& amax, at::ScalarType dtype) {
  const bool float8 = dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2;
  const bool amax_dtype = amax.scalar_type() == at::kFloat || amax.scalar_type() == hp.scalar_type();
  return kernel_dtype(hp.scalar_type()) && float8 && amax_dtype && hp.numel() > 0 &&
         on_device(hp.device(), {&amax}) && amax_axis(amax) != -2;
}

}  // namespace detail

/// titan::float8_cast on CUDA tensors.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> float8_cast(const at::Tensor& hp, const at::Tensor& amax,
                                                                  at::ScalarType dtype, bool power_of_2) {
  if (!detail::cast_kernels_take(hp, amax, dtype) || !hp.is_non_overlapping_and_dense())
    return titan::detail::float8_cast_aten(hp, amax, dtype, power_of_2);
  titan::detail::check_float8_cast(hp, amax, dtype);
  const int64_t axis = detail::amax_axis(amax);
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
/// one layout asked for is hp's own, else the tiled kernel over hp's rows (or, column-major, its
/// transpose's); the inputs titan::float8_cast's kernel does not take, an amax of more than one
/// element along both dimensions and an hp contiguous along neither dimension take the ATen
/// implementation.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> float8_cast_transpose(
    const at::Tensor& hp, const at::Tensor& amax, at::ScalarType dtype, bool power_of_2, bool row_major,
    bool column_major) {
  titan::detail::check_float8_cast_transpose(hp, row_major, column_major);
  if (!detail::cast_kernels_take(hp, amax, dtype) || (hp.stride(1) != 1 && hp.stride(0) != 1))
    return titan::detail::float8_cast_transpose_aten(hp, amax, dtype, power_of_2, row_major, column_major);
  titan::detail::check_float8_cast(hp, amax, dtype);
  const int64_t axis = detail::amax_axis(amax);
  if (row_major != column_major && (row_major ? hp.is_contiguous() : hp.t().is_contiguous())) {
    auto [data, scale, inverse] = float8_cast(hp, amax, dtype, power_of_2);  // hp's layout: the one asked for
    return {row_major ? data : at::Tensor(), column_major ? data : at::Tensor(), scale, inverse};
  }
  const detail::DeviceGuard guard(hp.device());
  const auto options = hp.options().dtype(dtype);
  auto rows_out = row_major ? at::empty(hp.sizes(), options) : at::Tensor();  // [rows, cols]
  // [rows, cols], strides [1, rows]
  auto columns_out = column_major ? at::empty({hp.size(1), hp.size(0)}, options).t() : at::Tensor();
  auto scale = at::empty(amax.sizes(), amax.options().dtype(at::kFloat));  // amax's shape
  auto inverse = at::empty_like(scale);
  // The rows read: hp's, or (column-major) its transpose's, whose own layout is the column-major one.
  const bool by_columns = hp.stride(1) != 1;
  const auto src = by_columns ? hp.t() : hp;  // [rows, cols], consecutive along each row
  auto& same = by_columns ? columns_out : rows_out;
  auto& transposed = by_columns ? rows_out : columns_out;
  const int64_t rows = src.size(0), cols = src.size(1);
  const int64_t src_axis = axis < 0 ? axis : (by_columns ? 1 - axis : axis);
  const int64_t amax_step = axis >= 0 ? amax.stride(axis) : 0;
  const int64_t tiles_down = (rows + detail::kTransposeTile - 1) / detail::kTransposeTile;
  const int64_t tiles_across = (cols + detail::kTransposeTile - 1) / detail::kTransposeTile;
  const int64_t src_extent = (rows - 1) * src.stride(0) + cols;
  const auto bytes = [](const at::Tensor& t) { return t.defined() ? static_cast<uint8_t*>(t.data_ptr()) : nullptr; };
  TITAN_DISPATCH_KERNEL_DTYPES(hp.scalar_type(), "titan::float8_cast_transpose", [&] {
    const bool packed = detail::packable<scalar_t>({src.data_ptr()}, {src.stride(0)}) &&
                        rows % detail::kTransposeChunk == 0 && cols % detail::kTransposeChunk == 0;
    detail::with_pack_width<scalar_t>(packed, [&](auto width) {
      const int64_t extent = std::max({src_extent, rows * cols, amax.numel() * std::max<int64_t>(amax_step, 1)});
      detail::with_index_type(extent, [&](auto index) {
        using index_t = decltype(index);
        const detail::TransposeShape<index_t> shape{static_cast<index_t>(rows), static_cast<index_t>(cols),
                                                    static_cast<index_t>(src.stride(0)),
                                                    static_cast<index_t>(tiles_down * tiles_across),
                                                    detail::divider<index_t>(tiles_across)};
        const detail::AmaxEntries<scalar_t, index_t> entries{amax.data_ptr(), amax.scalar_type() != at::kFloat,
                                                             static_cast<index_t>(amax_step)};
        const auto kernel =
            dtype == at::kFloat8_e4m3fn
                ? detail::float8_cast_transpose_kernel<scalar_t, c10::Float8_e4m3fn, index_t, width>
                : detail::float8_cast_transpose_kernel<scalar_t, c10::Float8_e5m2, index_t, width>;
        const auto max = static_cast<float>(titan::detail::float8_max(dtype));
        if (axis >= 0)
          detail::launch(detail::float8_scales_kernel<scalar_t, index_t>, detail::grid_stride_blocks(amax.numel()),
                         detail::kElementwiseThreads, entries, static_cast<index_t>(amax.numel()),
                         scale.data_ptr<float>(), inverse.data_ptr<float>(), max, power_of_2);
        const int64_t blocks = std::min<int64_t>(tiles_down * tiles_across, detail::multiprocessors() * 8);
        detail::launch(kernel, static_cast<unsigned>(blocks), detail::kTransposeThreads, src.data_ptr<scalar_t>(),
                       shape, bytes(same), bytes(transposed), scale.data_ptr<float>(), inverse.data_ptr<float>(),
                       entries, static_cast<int>(src_axis), max, power_of_2);
      });
    });
  });
  return {rows_out, columns_out, scale, inverse};
}

}  // namespace titan::cuda
