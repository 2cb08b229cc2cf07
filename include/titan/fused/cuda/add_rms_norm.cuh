#pragma once
// titan/fused/cuda/add_rms_norm.cuh: the CUDA kernels of titan::add_rms_norm_forward and
// titan::add_rms_norm_backward (see titan/fused/add_rms_norm.hpp for the formulas). One block per
// row: the forward writes sum (rounded to the inputs' dtype, as at::add) and normed from it, with
// rstd in fp32; the backward writes the input gradient of a row in one pass (rstd saved, the row's
// dot product of the weighted gradient with the normalized sum reduced in the block), and the
// weight's gradient in a second, column-parallel pass over row chunks whose partial sums one
// at::sum adds; all in 16-byte packs where every row starts at a 16-byte boundary. Compiled by
// nvcc into titan::cuda_kernels; other dtypes than fp32, fp16 and bf16,
// and a backward's arguments of other shapes or devices than the forward gave, take the ATen
// implementation.
#include <titan/fused/add_rms_norm.hpp>
#include <titan/fused/cuda/inputs.cuh>
#include <titan/fused/cuda/pack.cuh>
#include <titan/fused/cuda/rows.cuh>
#include <titan/fused/cuda/runtime.cuh>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace titan::cuda {
namespace detail {

inline constexpr int kColumnTile = 32, kColumnRowThreads = 8;  // the weight-gradient pass: 32 columns x 8 rows

/// Row blockIdx.x of x, delta [rows, dim]: sum = x + delta, rstd = 1 / sqrt(mean(sum^2) + eps),
/// normed = sum * rstd * weight; kWidth elements at a time (dim a multiple of it).
template <typename scalar_t, int kWidth>
__global__ void add_rms_norm_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ delta,
                                  const scalar_t* __restrict__ weight, scalar_t* __restrict__ sum,
                                  scalar_t* __restrict__ normed, float* __restrict__ rstd, int64_t dim, float eps) {
  const int64_t row = blockIdx.x * dim;
  float squares = 0.f;
  for (int64_t v = threadIdx.x * kWidth; v < dim; v += blockDim.x * kWidth) {
    const auto a = load_pack<kWidth>(x + row + v), b = load_pack<kWidth>(delta + row + v);
    Pack<scalar_t, kWidth> s;
    for (int j = 0; j < kWidth; ++j) {
      s.v[j] = static_cast<scalar_t>(static_cast<float>(a.v[j]) + static_cast<float>(b.v[j]));
      const float f = static_cast<float>(s.v[j]);
      squares += f * f;
    }
    store_pack<kWidth>(sum + row + v, s);
  }
  const float r = rsqrtf(block_sum(squares) / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int64_t v = threadIdx.x * kWidth; v < dim; v += blockDim.x * kWidth) {  // this thread's own writes: no barrier
    const auto s = load_pack<kWidth>(sum + row + v), w = load_pack<kWidth>(weight + v);
    Pack<scalar_t, kWidth> y;
    for (int j = 0; j < kWidth; ++j)
      y.v[j] = static_cast<scalar_t>(static_cast<float>(s.v[j]) * r * static_cast<float>(w.v[j]));
    store_pack<kWidth>(normed + row + v, y);
  }
}

/// Row blockIdx.x: d_input = rstd * (g - y * mean(g * y)) (+ grad_sum), g = grad_normed * weight,
/// y = sum * rstd; kWidth elements at a time.
template <typename scalar_t, int kWidth>
__global__ void add_rms_norm_input_grad(const scalar_t* __restrict__ grad_sum, const scalar_t* __restrict__ grad_normed,
                                        const scalar_t* __restrict__ sum, const scalar_t* __restrict__ weight,
                                        const float* __restrict__ rstd, scalar_t* __restrict__ d_input, int64_t dim) {
  const int64_t row = blockIdx.x * dim;
  const float r = rstd[blockIdx.x];
  float dot = 0.f;
  for (int64_t v = threadIdx.x * kWidth; v < dim; v += blockDim.x * kWidth) {
    const auto dy = load_pack<kWidth>(grad_normed + row + v), s = load_pack<kWidth>(sum + row + v);
    const auto w = load_pack<kWidth>(weight + v);
    for (int j = 0; j < kWidth; ++j)
      dot += static_cast<float>(dy.v[j]) * static_cast<float>(w.v[j]) * static_cast<float>(s.v[j]) * r;
  }
  const float mean = block_sum(dot) / static_cast<float>(dim);
  for (int64_t v = threadIdx.x * kWidth; v < dim; v += blockDim.x * kWidth) {
    const auto dy = load_pack<kWidth>(grad_normed + row + v), s = load_pack<kWidth>(sum + row + v);
    const auto w = load_pack<kWidth>(weight + v);
    Pack<scalar_t, kWidth> residual, out;
    if (grad_sum != nullptr) residual = load_pack<kWidth>(grad_sum + row + v);
    for (int j = 0; j < kWidth; ++j) {
      const float g = static_cast<float>(dy.v[j]) * static_cast<float>(w.v[j]);
      const float y = static_cast<float>(s.v[j]) * r;
      float d = r * (g - y * mean);
      if (grad_sum != nullptr) d += static_cast<float>(residual.v[j]);
      out.v[j] = static_cast<scalar_t>(d);
    }
    store_pack<kWidth>(d_input + row + v, out);
  }
}

/// Columns [blockIdx.x * kColumnTile * kWidth, + kColumnTile * kWidth), kWidth per thread, over
/// rows chunk blockIdx.y of `rows_per_chunk`: partial[blockIdx.y, column] = sum over those rows of
/// grad_normed * sum * rstd.
template <typename scalar_t, int kWidth>
__global__ void add_rms_norm_weight_grad(const scalar_t* __restrict__ grad_normed, const scalar_t* __restrict__ sum,
                                         const float* __restrict__ rstd, float* __restrict__ partial, int64_t rows,
                                         int64_t dim, int64_t rows_per_chunk) {
  __shared__ float tile[kColumnRowThreads][kColumnTile * kWidth];
  const int64_t column = (int64_t{blockIdx.x} * kColumnTile + threadIdx.x) * kWidth;
  const int64_t first = int64_t{blockIdx.y} * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
  float acc[kWidth] = {};
  if (column < dim)
    for (int64_t r = first + threadIdx.y; r < last; r += kColumnRowThreads) {
      const auto g = load_pack<kWidth>(grad_normed + r * dim + column), s = load_pack<kWidth>(sum + r * dim + column);
      const float rs = rstd[r];
      for (int j = 0; j < kWidth; ++j) acc[j] += static_cast<float>(g.v[j]) * static_cast<float>(s.v[j]) * rs;
    }
  for (int j = 0; j < kWidth; ++j) tile[threadIdx.y][threadIdx.x * kWidth + j] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && column < dim)
    for (int j = 0; j < kWidth; ++j) {
      float total = acc[j];
      for (int t = 1; t < kColumnRowThreads; ++t) total += tile[t][threadIdx.x * kWidth + j];
      partial[int64_t{blockIdx.y} * dim + column + j] = total;
    }
}

}  // namespace detail

/// titan::add_rms_norm_forward on CUDA tensors (same contract as the ATen implementation).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_forward(const at::Tensor& x, const at::Tensor& delta,
                                                                           const at::Tensor& weight, double eps) {
  if (!detail::kernel_dtype(x.scalar_type())) return titan::detail::add_rms_norm_forward_aten(x, delta, weight, eps);
  titan::detail::check_add_rms_norm_inputs(x, delta, weight);
  const detail::DeviceGuard guard(x.device());
  const auto a = x.contiguous(), b = delta.contiguous(), w = weight.contiguous();  // [..., D], [D]
  const int64_t dim = a.size(-1), rows = a.numel() / std::max<int64_t>(dim, 1);
  auto sum = at::empty_like(a), normed = at::empty_like(a);  // [..., D]
  auto rstd_shape = a.sizes().vec();
  rstd_shape.back() = 1;
  auto rstd = at::empty(rstd_shape, a.options().dtype(at::kFloat));  // [..., 1]
  if (rows > 0 && dim > 0) {
    TITAN_DISPATCH_KERNEL_DTYPES(a.scalar_type(), "titan::add_rms_norm_forward", [&] {
      const bool packed = detail::packable<scalar_t>(
          {a.data_ptr(), b.data_ptr(), w.data_ptr(), sum.data_ptr(), normed.data_ptr()}, {dim});
      detail::with_pack_width<scalar_t>(packed, [&](auto width) {
        detail::launch(detail::add_rms_norm_rows<scalar_t, width>, static_cast<unsigned>(rows),
                       detail::row_threads(dim, width), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                       w.data_ptr<scalar_t>(), sum.data_ptr<scalar_t>(), normed.data_ptr<scalar_t>(),
                       rstd.data_ptr<float>(), dim, static_cast<float>(eps));
      });
    });
  }
  return {sum, normed, rstd};
}

/// titan::add_rms_norm_backward on CUDA tensors (same contract as the ATen implementation).
inline std::tuple<at::Tensor, at::Tensor> add_rms_norm_backward(const std::optional<at::Tensor>& grad_sum,
                                                                const at::Tensor& grad_normed, const at::Tensor& sum,
                                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                                double eps) {
  const bool residual = grad_sum && grad_sum->defined();
  // What the forward gave: grad_sum [..., D] like sum, rstd [..., 1] in fp32, all on sum's device.
  const bool as_forward_gave =
      sum.dim() >= 1 && rstd.scalar_type() == at::kFloat && grad_normed.scalar_type() == sum.scalar_type() &&
      rstd.numel() * sum.size(-1) == sum.numel() &&
      (!residual || (grad_sum->scalar_type() == sum.scalar_type() && grad_sum->sizes() == sum.sizes())) &&
      detail::on_device(sum.device(), {&grad_normed, &rstd, residual ? &*grad_sum : &sum});
  if (!detail::kernel_dtype(sum.scalar_type()) || !as_forward_gave)
    return titan::detail::add_rms_norm_backward_aten(grad_sum, grad_normed, sum, weight, rstd, eps);
  titan::detail::check_add_rms_norm_inputs(sum, grad_normed, weight);
  const detail::DeviceGuard guard(sum.device());
  const auto s = sum.contiguous(), g = grad_normed.contiguous(), w = weight.contiguous();  // [..., D], [D]
  const auto r = rstd.contiguous();                                                        // [..., 1]
  const auto gs = residual ? grad_sum->contiguous() : at::Tensor();                        // [..., D]
  const int64_t dim = s.size(-1), rows = s.numel() / std::max<int64_t>(dim, 1);
  auto d_input = at::empty_like(s);  // [..., D]
  at::Tensor partial;                // [chunks, D]: the weight gradient's sums over row chunks
  if (rows > 0 && dim > 0) {
    TITAN_DISPATCH_KERNEL_DTYPES(s.scalar_type(), "titan::add_rms_norm_backward", [&] {
      const bool packed = detail::packable<scalar_t>(
          {residual ? gs.data_ptr() : nullptr, g.data_ptr(), s.data_ptr(), w.data_ptr(), d_input.data_ptr()}, {dim});
      detail::with_pack_width<scalar_t>(packed, [&](auto width) {
        detail::launch(detail::add_rms_norm_input_grad<scalar_t, width>, static_cast<unsigned>(rows),
                       detail::row_threads(dim, width), residual ? gs.data_ptr<scalar_t>() : nullptr,
                       g.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), r.data_ptr<float>(),
                       d_input.data_ptr<scalar_t>(), dim);
        // Row chunks for the weight's gradient: enough blocks to fill the GPU, each chunk at least 64 rows.
        const int64_t tile_columns = int64_t{detail::kColumnTile} * width;
        const int64_t tiles = (dim + tile_columns - 1) / tile_columns;
        const int64_t chunks = std::clamp<int64_t>(detail::multiprocessors() * 4 / tiles, 1,
                                                   std::max<int64_t>(rows / 64, 1));
        const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
        partial = at::empty({chunks, dim}, s.options().dtype(at::kFloat));
        detail::launch(detail::add_rms_norm_weight_grad<scalar_t, width>,
                       dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks)),
                       dim3(detail::kColumnTile, detail::kColumnRowThreads), g.data_ptr<scalar_t>(),
                       s.data_ptr<scalar_t>(), r.data_ptr<float>(), partial.data_ptr<float>(), rows, dim,
                       rows_per_chunk);
      });
    });
  } else {
    partial = at::zeros({1, dim}, s.options().dtype(at::kFloat));
  }
  return {d_input, at::sum(partial, 0).to(weight.scalar_type())};  // [..., D], [D]
}

}  // namespace titan::cuda
