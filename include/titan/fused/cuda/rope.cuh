#pragma once
// titan/fused/cuda/rope.cuh: the CUDA kernels of titan::rope_forward and titan::rope_backward
// (see titan/fused/rope.hpp for the formulas): one pass over q and k together, a thread per element
// pair or per 16-byte pack of pairs, in fp32, reading q and k in place when they are column slices
// of one tensor (the fused wq|wk|wv projection, titan::linear_fused). Compiled by nvcc into
// titan::cuda_kernels; other dtypes than fp32, fp16 and bf16 take the ATen implementation.
#include <titan/fused/cuda/grid.cuh>
#include <titan/fused/cuda/inputs.cuh>
#include <titan/fused/cuda/pack.cuh>
#include <titan/fused/rope.hpp>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

namespace titan::cuda {
namespace detail {

/// One of q and k as the kernel walks it: x [B, S, H, D] with each token's H x D elements
/// contiguous and tokens `stride` elements apart, out [B, S, H, D] contiguous.
template <typename scalar_t, typename index_t>
struct RopeTensor {
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ out;
  Divider<index_t> token_pairs;  // H x D/2: the pairs of a token
  index_t stride;
};

/// The kWidth / 2 pairs of `t` from pair p on (within one head) rotated by +-theta of their position
/// and frequencies: cos, sin [S, D/2] (x's dtype or fp32); sign -1 for the backward's rotation by
/// -theta.
template <int kWidth, typename scalar_t, typename table_t, typename index_t>
__device__ inline void rope_pairs(const RopeTensor<scalar_t, index_t>& t, const table_t* __restrict__ cos,
                                  const table_t* __restrict__ sin, index_t p, const Divider<index_t>& half,
                                  const Divider<index_t>& seq, float sign) {
  const auto token = t.token_pairs.divmod(p);                   // token (b, s) and pair within it
  const index_t table = seq.mod(token.div) * half.divisor + half.mod(token.mod);  // [s, frequency]
  const auto x = load_pack<kWidth>(t.x + token.div * t.stride + 2 * token.mod);
  Pack<scalar_t, kWidth> y;
  for (int j = 0; j < kWidth / 2; ++j) {
    const float c = static_cast<float>(cos[table + j]), sn = sign * static_cast<float>(sin[table + j]);
    const float x0 = static_cast<float>(x.v[2 * j]), x1 = static_cast<float>(x.v[2 * j + 1]);
    y.v[2 * j] = static_cast<scalar_t>(x0 * c - x1 * sn);
    y.v[2 * j + 1] = static_cast<scalar_t>(x0 * sn + x1 * c);
  }
  store_pack<kWidth>(t.out + 2 * p, y);
}

/// The pairs of q (the first q_pairs of the grid-stride loop) and then of k, kWidth / 2 at a time.
template <typename scalar_t, typename table_t, typename index_t, int kWidth>
__global__ void rope_kernel(RopeTensor<scalar_t, index_t> q, RopeTensor<scalar_t, index_t> k,
                            const table_t* __restrict__ cos, const table_t* __restrict__ sin, index_t q_pairs,
                            index_t total, Divider<index_t> half, Divider<index_t> seq, float sign) {
  constexpr int kPairs = kWidth / 2;
  for (index_t p = first_element<index_t, kPairs>(); p < total; p += element_stride<index_t, kPairs>()) {
    if (p < q_pairs)
      rope_pairs<kWidth>(q, cos, sin, p, half, seq, sign);
    else
      rope_pairs<kWidth>(k, cos, sin, p - q_pairs, half, seq, sign);
  }
}

/// q and k rotated by +theta (sign 1) or -theta (sign -1). Tables in q's dtype (FSDP's cast of a
/// block's inputs) are read as they are, others as fp32.
inline std::tuple<at::Tensor, at::Tensor> rope_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                      const at::Tensor& sin, float sign) {
  const DeviceGuard guard(q.device());
  const auto x_rows = rows_of(q, 2), y_rows = rows_of(k, 2);  // [B, S, H, D], tokens in strided rows
  const auto &x = x_rows.tensor, &y = y_rows.tensor;
  const bool native = cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type();
  const auto table = native ? x.scalar_type() : at::kFloat;
  const auto c = cos.to(table).contiguous(), s = sin.to(table).contiguous();  // [S, D/2]
  auto x_out = at::empty(x.sizes(), x.options()), y_out = at::empty(y.sizes(), y.options());  // [B, S, H, D]
  const int64_t q_pairs = x.numel() / 2, k_pairs = y.numel() / 2, half = x.size(3) / 2;
  if (q_pairs + k_pairs == 0) return {x_out, y_out};
  const int64_t q_token = x.size(2) * x.size(3), k_token = y.size(2) * y.size(3);  // elements of a token
  const int64_t extent = std::max({q_pairs + k_pairs, x.numel(), y.numel(),
                                   rows_extent(x.numel(), q_token, x_rows.stride),
                                   rows_extent(y.numel(), k_token, y_rows.stride)});
  TITAN_DISPATCH_KERNEL_DTYPES(x.scalar_type(), "titan::rope", [&] {
    // Packs (several pairs of one head) where D and every token's start in q, k and the outputs allow.
    const bool packed = packable<scalar_t>({x.data_ptr(), y.data_ptr(), x_out.data_ptr(), y_out.data_ptr()},
                                           {x.size(3), x_rows.stride, y_rows.stride});
    with_pack_width<scalar_t, /*kSingle=*/2>(packed, [&](auto width) {
      with_index_type(extent, [&](auto index) {
        using index_t = decltype(index);
        const RopeTensor<scalar_t, index_t> q_walk{x.data_ptr<scalar_t>(), x_out.data_ptr<scalar_t>(),
                                                   divider<index_t>(q_token / 2), static_cast<index_t>(x_rows.stride)};
        const RopeTensor<scalar_t, index_t> k_walk{y.data_ptr<scalar_t>(), y_out.data_ptr<scalar_t>(),
                                                   divider<index_t>(k_token / 2), static_cast<index_t>(y_rows.stride)};
        auto rotate = [&](auto* cos_data, auto* sin_data) {
          using table_t = std::remove_const_t<std::remove_pointer_t<decltype(cos_data)>>;
          launch(rope_kernel<scalar_t, table_t, index_t, width>, grid_stride_blocks((q_pairs + k_pairs) / (width / 2)),
                 kElementwiseThreads, q_walk, k_walk, cos_data, sin_data, q_pairs, q_pairs + k_pairs,
                 divider<index_t>(half), divider<index_t>(x.size(1)), sign);
        };
        if (native)
          rotate(c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>());
        else
          rotate(c.data_ptr<float>(), s.data_ptr<float>());
      });
    });
  });
  return {x_out, y_out};
}

}  // namespace detail

/// titan::rope_forward on CUDA tensors.
inline std::tuple<at::Tensor, at::Tensor> rope_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                       const at::Tensor& sin) {
  titan::detail::check_rope_inputs(q, k, cos, sin);
  if (!detail::kernel_dtype(q.scalar_type())) return titan::detail::rope_forward_aten(q, k, cos, sin);
  return detail::rope_launch(q, k, cos, sin, 1.f);
}

/// titan::rope_backward on CUDA tensors.
inline std::tuple<at::Tensor, at::Tensor> rope_backward(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                        const at::Tensor& cos, const at::Tensor& sin) {
  titan::detail::check_rope_inputs(grad_q, grad_k, cos, sin);
  if (!detail::kernel_dtype(grad_q.scalar_type())) return titan::detail::rope_backward_aten(grad_q, grad_k, cos, sin);
  return detail::rope_launch(grad_q, grad_k, cos, sin, -1.f);
}

}  // namespace titan::cuda
