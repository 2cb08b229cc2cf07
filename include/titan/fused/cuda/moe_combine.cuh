#pragma once
// titan/fused/cuda/moe_combine.cuh: the CUDA kernels of titan::moe_combine_forward and
// titan::moe_combine_backward (see titan/fused/moe_combine.hpp for the formulas). Forward: each
// slot's row found by one pass over the N rows (rows[slot[n]] = n), then one block per token
// summing its k weighted rows in fp32. Backward: one block per row, writing d out from the token's
// gradient row and reducing d weight in the block. The weight is read in fp32 (a bf16 weight
// converted first: exact), the products rounded to out's dtype as the ATen implementation rounds
// them; 16-byte packs where every row starts at a 16-byte boundary. Compiled by nvcc into
// titan::cuda_kernels; other dtypes than fp32, fp16 and bf16, and tensors on another device, take
// the ATen implementation.
#include <titan/fused/cuda/grid.cuh>
#include <titan/fused/cuda/inputs.cuh>
#include <titan/fused/cuda/pack.cuh>
#include <titan/fused/cuda/rows.cuh>
#include <titan/fused/cuda/runtime.cuh>
#include <titan/fused/moe_combine.hpp>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <optional>
#include <tuple>

namespace titan::cuda {
namespace detail {

/// rows[slot[i]] = i for the n rows (rows holds -1 before: the slots of dropped assignments).
template <typename index_t>
__global__ void moe_slot_rows(const index_t* __restrict__ slot, index_t* __restrict__ rows, index_t n, index_t slots) {
  for (index_t i = index_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += index_t{blockDim.x} * gridDim.x) {
    const index_t s = slot[i];
    CUDA_KERNEL_ASSERT(s >= 0 && s < slots);
    rows[s] = i;
  }
}

/// Token blockIdx.x: y[t] = Σ_j round(out[r_j] · weight[r_j]) over its k slots' rows r_j =
/// rows[t·k + j] (ascending j; -1: none), in fp32, rounded once; without a weight, the rows
/// themselves. kWidth elements at a time (dim a multiple of it).
template <typename scalar_t, int kWidth>
__global__ void moe_combine_tokens(const scalar_t* __restrict__ out, const float* __restrict__ weight,
                                   const int64_t* __restrict__ rows, scalar_t* __restrict__ y, int64_t dim, int64_t k) {
  const int64_t* token_rows = rows + int64_t{blockIdx.x} * k;  // [k]
  scalar_t* y_row = y + int64_t{blockIdx.x} * dim;               // [dim]
  for (int64_t v = threadIdx.x * kWidth; v < dim; v += blockDim.x * kWidth) {
    float sum[kWidth] = {};
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = token_rows[j];
      if (r < 0) continue;  // a dropped assignment
      const auto o = load_pack<kWidth>(out + r * dim + v);
      for (int i = 0; i < kWidth; ++i)
        sum[i] += weight != nullptr ? static_cast<float>(static_cast<scalar_t>(static_cast<float>(o.v[i]) * weight[r]))
                                    : static_cast<float>(o.v[i]);
    }
    Pack<scalar_t, kWidth> s;
    for (int i = 0; i < kWidth; ++i) s.v[i] = static_cast<scalar_t>(sum[i]);
    store_pack<kWidth>(y_row + v, s);
  }
}

/// Row blockIdx.x = n of token t = slot[n] / k (of `tokens`): d_out[n] = round(grad[t] · weight[n])
/// (grad[t] itself without a weight), and with d_weight, d_weight[n] = Σ grad[t] · out[n] in fp32.
template <typename scalar_t, int kWidth>
__global__ void moe_combine_grad_rows(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                      const float* __restrict__ weight, const int64_t* __restrict__ slot,
                                      scalar_t* __restrict__ d_out, float* __restrict__ d_weight, int64_t dim,
                                      int64_t k, int64_t tokens) {
  const int64_t n = blockIdx.x, t = slot[n] / k;
  CUDA_KERNEL_ASSERT(slot[n] >= 0 && t < tokens);
  const scalar_t* g_row = grad + t * dim;            // [dim]
  const scalar_t* o_row = out + n * dim;             // [dim]
  scalar_t* d_row = d_out + n * dim;                 // [dim]
  const float w = weight != nullptr ? weight[n] : 1.f;
  float dot = 0.f;
  for (int64_t v = threadIdx.x * kWidth; v < dim; v += blockDim.x * kWidth) {
    const auto g = load_pack<kWidth>(g_row + v);
    Pack<scalar_t, kWidth> d = g;
    if (weight != nullptr)
      for (int i = 0; i < kWidth; ++i) d.v[i] = static_cast<scalar_t>(static_cast<float>(g.v[i]) * w);
    store_pack<kWidth>(d_row + v, d);
    if (d_weight != nullptr) {
      const auto o = load_pack<kWidth>(o_row + v);
      for (int i = 0; i < kWidth; ++i) dot += static_cast<float>(g.v[i]) * static_cast<float>(o.v[i]);
    }
  }
  if (d_weight == nullptr) return;  // the same for the whole block: no thread skips the barriers below
  const float total = block_sum(dot);
  if (threadIdx.x == 0) d_weight[n] = total;
}

/// Whether the kernels take these inputs (else the ATen implementation): out in a kernel dtype,
/// the weight in fp32 or out's dtype, int64 slots, all on out's device.
inline bool moe_combine_takes(const at::Tensor& out, const std::optional<at::Tensor>& weight, const at::Tensor& slot,
                              const at::Tensor* grad = nullptr) {
  const bool weighted = titan::detail::weighted(weight);
  return out.dim() == 2 && kernel_dtype(out.scalar_type()) && slot.scalar_type() == at::kLong &&
         (!weighted || weight->scalar_type() == at::kFloat || weight->scalar_type() == out.scalar_type()) &&
         (grad == nullptr || grad->scalar_type() == out.scalar_type()) &&
         on_device(out.device(), {&slot, weighted ? &*weight : &out, grad != nullptr ? grad : &out});
}

}  // namespace detail

/// titan::moe_combine_forward on CUDA tensors (same contract as the ATen implementation).
inline at::Tensor moe_combine_forward(const at::Tensor& out, const std::optional<at::Tensor>& weight,
                                      const at::Tensor& slot, int64_t tokens, int64_t k) {
  if (!detail::moe_combine_takes(out, weight, slot))
    return titan::detail::moe_combine_forward_aten(out, weight, slot, tokens, k);
  titan::detail::check_moe_combine_inputs(out, weight, slot, tokens, k);
  const detail::DeviceGuard guard(out.device());
  const auto o = out.contiguous(), s = slot.contiguous();  // [N, dim], [N]
  const auto w = titan::detail::weighted(weight) ? weight->to(at::kFloat).contiguous() : at::Tensor();  // [N]
  const int64_t n = o.size(0), dim = o.size(1);
  auto rows = at::full({tokens * k}, -1, s.options());  // [T·k]: each slot's row, -1 for none
  if (n > 0)
    detail::launch(detail::moe_slot_rows<int64_t>, detail::grid_stride_blocks(n), detail::kElementwiseThreads,
                   s.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), n, tokens * k);
  auto y = at::empty({tokens, dim}, o.options());  // [T, dim]
  if (tokens > 0 && dim > 0) {
    TITAN_DISPATCH_KERNEL_DTYPES(o.scalar_type(), "titan::moe_combine_forward", [&] {
      const bool packed = detail::packable<scalar_t>({o.data_ptr(), y.data_ptr()}, {dim});
      detail::with_pack_width<scalar_t>(packed, [&](auto width) {
        detail::launch(detail::moe_combine_tokens<scalar_t, width>, static_cast<unsigned>(tokens),
                       detail::row_threads(dim, width), o.data_ptr<scalar_t>(),
                       w.defined() ? w.data_ptr<float>() : nullptr, rows.data_ptr<int64_t>(), y.data_ptr<scalar_t>(),
                       dim, k);
      });
    });
  }
  return y;
}

/// titan::moe_combine_backward on CUDA tensors (same contract as the ATen implementation; d weight
/// summed in fp32 in the block's order, then rounded to the weight's dtype).
inline std::tuple<at::Tensor, at::Tensor> moe_combine_backward(const at::Tensor& grad, const at::Tensor& out,
                                                               const std::optional<at::Tensor>& weight,
                                                               const at::Tensor& slot, int64_t k) {
  if (!detail::moe_combine_takes(out, weight, slot, &grad))
    return titan::detail::moe_combine_backward_aten(grad, out, weight, slot, k);
  titan::detail::check_moe_combine_grad(grad, out, weight, slot, k);
  const detail::DeviceGuard guard(out.device());
  const bool weighted = titan::detail::weighted(weight);
  const auto g = grad.contiguous(), o = out.contiguous(), s = slot.contiguous();  // [T, dim], [N, dim], [N]
  const auto w = weighted ? weight->to(at::kFloat).contiguous() : at::Tensor();     // [N]
  const int64_t n = o.size(0), dim = o.size(1);
  auto d_out = at::empty_like(o);                                                  // [N, dim]
  auto d_weight = weighted ? at::empty({n}, o.options().dtype(at::kFloat)) : at::Tensor();  // [N]
  if (n > 0 && dim > 0) {
    TITAN_DISPATCH_KERNEL_DTYPES(o.scalar_type(), "titan::moe_combine_backward", [&] {
      const bool packed = detail::packable<scalar_t>({g.data_ptr(), o.data_ptr(), d_out.data_ptr()}, {dim});
      detail::with_pack_width<scalar_t>(packed, [&](auto width) {
        detail::launch(detail::moe_combine_grad_rows<scalar_t, width>, static_cast<unsigned>(n),
                       detail::row_threads(dim, width), g.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                       weighted ? w.data_ptr<float>() : nullptr, s.data_ptr<int64_t>(), d_out.data_ptr<scalar_t>(),
                       weighted ? d_weight.data_ptr<float>() : nullptr, dim, k, g.size(0));
      });
    });
  } else if (weighted) {
    d_weight.zero_();
  }
  return {d_out, weighted ? d_weight.to(weight->scalar_type()) : at::Tensor()};  // [N, dim], [N]
}

}  // namespace titan::cuda
