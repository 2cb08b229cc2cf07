#pragma once
// titan/fused/cuda/swiglu.cuh: the CUDA kernels of titan::swiglu_forward and
// titan::swiglu_backward (see titan/fused/swiglu.hpp for the formulas): one element-wise pass
// each way, in fp32, reading gate and up in place when they are column slices of one tensor (the
// fused w1|w3 projection, titan::linear_fused), in 16-byte packs where every row starts at a
// 16-byte boundary (titan/fused/cuda/pack.cuh). Compiled by nvcc into titan::cuda_kernels; other
// dtypes than fp32, fp16 and bf16 take the ATen implementation.
#include <titan/fused/cuda/grid.cuh>
#include <titan/fused/cuda/inputs.cuh>
#include <titan/fused/cuda/pack.cuh>
#include <titan/fused/swiglu.hpp>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <tuple>

namespace titan::cuda {
namespace detail {

/// gate and up [rows, cols] in rows gate_stride and up_stride elements apart; out contiguous;
/// kWidth elements at a time (a pack lies within one row: cols is a multiple of it).
template <typename scalar_t, typename index_t, int kWidth>
__global__ void swiglu_forward_kernel(const scalar_t* __restrict__ gate, const scalar_t* __restrict__ up,
                                      scalar_t* __restrict__ out, index_t n, Divider<index_t> cols,
                                      index_t gate_stride, index_t up_stride) {
  for (index_t i = first_element<index_t, kWidth>(); i < n; i += element_stride<index_t, kWidth>()) {
    const auto rc = cols.divmod(i);  // row and column of element i
    const auto a = load_pack<kWidth>(gate + rc.div * gate_stride + rc.mod);
    const auto b = load_pack<kWidth>(up + rc.div * up_stride + rc.mod);
    Pack<scalar_t, kWidth> y;
    for (int j = 0; j < kWidth; ++j) {
      const float g = static_cast<float>(a.v[j]);
      const float s = 1.f / (1.f + expf(-g));
      y.v[j] = static_cast<scalar_t>(g * s * static_cast<float>(b.v[j]));
    }
    store_pack<kWidth>(out + i, y);
  }
}

/// grad, d_gate and d_up contiguous; gate and up as in the forward.
template <typename scalar_t, typename index_t, int kWidth>
__global__ void swiglu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ gate,
                                       const scalar_t* __restrict__ up, scalar_t* __restrict__ d_gate,
                                       scalar_t* __restrict__ d_up, index_t n, Divider<index_t> cols,
                                       index_t gate_stride, index_t up_stride) {
  for (index_t i = first_element<index_t, kWidth>(); i < n; i += element_stride<index_t, kWidth>()) {
    const auto rc = cols.divmod(i);  // row and column of element i
    const auto dy = load_pack<kWidth>(grad + i);
    const auto a = load_pack<kWidth>(gate + rc.div * gate_stride + rc.mod);
    const auto b = load_pack<kWidth>(up + rc.div * up_stride + rc.mod);
    Pack<scalar_t, kWidth> da, db;
    for (int j = 0; j < kWidth; ++j) {
      const float g = static_cast<float>(dy.v[j]), x = static_cast<float>(a.v[j]);
      const float s = 1.f / (1.f + expf(-x));
      da.v[j] = static_cast<scalar_t>(g * static_cast<float>(b.v[j]) * s * (1.f + x * (1.f - s)));
      db.v[j] = static_cast<scalar_t>(g * x * s);
    }
    store_pack<kWidth>(d_gate + i, da);
    store_pack<kWidth>(d_up + i, db);
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
    TITAN_DISPATCH_KERNEL_DTYPES(gate.scalar_type(), "titan::swiglu_forward", [&] {
      const bool packed = detail::packable<scalar_t>({a.tensor.data_ptr(), b.tensor.data_ptr(), out.data_ptr()},
                                                     {walk.cols, a.stride, b.stride});
      detail::with_pack_width<scalar_t>(packed, [&](auto width) {
        detail::with_index_type(walk.extent, [&](auto index) {
          using index_t = decltype(index);
          detail::launch(detail::swiglu_forward_kernel<scalar_t, index_t, width>, detail::grid_stride_blocks(n / width),
                         detail::kElementwiseThreads, a.tensor.data_ptr<scalar_t>(), b.tensor.data_ptr<scalar_t>(),
                         out.data_ptr<scalar_t>(), n, detail::divider<index_t>(walk.cols), a.stride, b.stride);
        });
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
    TITAN_DISPATCH_KERNEL_DTYPES(gate.scalar_type(), "titan::swiglu_backward", [&] {
      const bool packed = detail::packable<scalar_t>(
          {g.data_ptr(), a.tensor.data_ptr(), b.tensor.data_ptr(), d_gate.data_ptr(), d_up.data_ptr()},
          {walk.cols, a.stride, b.stride});
      detail::with_pack_width<scalar_t>(packed, [&](auto width) {
        detail::with_index_type(walk.extent, [&](auto index) {
          using index_t = decltype(index);
          detail::launch(detail::swiglu_backward_kernel<scalar_t, index_t, width>,
                         detail::grid_stride_blocks(n / width), detail::kElementwiseThreads, g.data_ptr<scalar_t>(),
                         a.tensor.data_ptr<scalar_t>(), b.tensor.data_ptr<scalar_t>(), d_gate.data_ptr<scalar_t>(),
                         d_up.data_ptr<scalar_t>(), n, detail::divider<index_t>(walk.cols), a.stride, b.stride);
        });
      });
    });
  }
  return {d_gate, d_up};
}

}  // namespace titan::cuda
