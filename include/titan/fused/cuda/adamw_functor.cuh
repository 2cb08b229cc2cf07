#pragma once
// titan/fused/cuda/adamw_functor.cuh: what one block of titan::adamw_copy_'s kernel computes (see
// titan/fused/adamw.hpp for the formulas): AdamW over one chunk of one parameter in fp32, with
// ATen's fused AdamW arithmetic, the gradient read in its own dtype and the parameter's copy
// written in its own. titan/fused/cuda/adamw.cuh launches it over all the tensors at once with
// ATen's multi-tensor apply; the test suite's emulator runs it under a launcher of its own.
#include <titan/fused/cuda/runtime.cuh>

#include <ATen/native/cuda/Pow.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace titan::cuda::detail {

/// The lists, in the order multi_tensor_apply walks them.
enum AdamWCopyList { kParam = 0, kGrad, kExpAvg, kExpAvgSq, kCopy, kAdamWCopyLists };

/// One block of the multi-tensor launch: a chunk of one parameter. Parameters and moments are fp32;
/// gradients grad_t, copies copy_t. `tl` is ATen's FusedOptimizerTensorListMetadata<kAdamWCopyLists>
/// (its addresses per list and tensor, numel_for_tensor, block_to_tensor, block_to_chunk and
/// state_steps_addresses; the emulated suite's launcher fills a struct with the same fields).
template <typename grad_t, typename copy_t>
struct AdamWCopyFunctor {
  template <typename Metadata>
  __device__ __forceinline__ void operator()(int64_t chunk_size, Metadata& tl, double lr, double beta1, double beta2,
                                             double weight_decay, double eps, const float* grad_scale,
                                             const float* found_inf) {
    const int tensor = tl.block_to_tensor[blockIdx.x];
    const int64_t start = int64_t{tl.block_to_chunk[blockIdx.x]} * chunk_size;
    const int64_t n = std::min(chunk_size, tl.numel_for_tensor[tensor] - start);
    auto* param = static_cast<float*>(const_cast<void*>(tl.addresses[kParam][tensor])) + start;        // [n]
    auto* grad = static_cast<grad_t*>(const_cast<void*>(tl.addresses[kGrad][tensor])) + start;         // [n]
    auto* exp_avg = static_cast<float*>(const_cast<void*>(tl.addresses[kExpAvg][tensor])) + start;     // [n]
    auto* exp_avg_sq = static_cast<float*>(const_cast<void*>(tl.addresses[kExpAvgSq][tensor])) + start;  // [n]
    auto* copy = static_cast<copy_t*>(const_cast<void*>(tl.addresses[kCopy][tensor])) + start;         // [n]
    const bool skip = found_inf != nullptr && *found_inf == 1.f;
    const float lr_f = static_cast<float>(lr), beta1_f = static_cast<float>(beta1),
                beta2_f = static_cast<float>(beta2), decay_f = static_cast<float>(weight_decay),
                eps_f = static_cast<float>(eps);
    const float step = *static_cast<const float*>(tl.state_steps_addresses[tensor]);
    const float bias_correction1 = 1 - at::native::pow_(beta1_f, step);
    const float bias_correction2_sqrt = std::sqrt(1 - at::native::pow_(beta2_f, step));
    const float step_size = lr_f / bias_correction1;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      float p = param[i];
      if (!skip) {
        float g = static_cast<float>(grad[i]);
        if (grad_scale != nullptr) {
          g /= *grad_scale;
          grad[i] = static_cast<grad_t>(g);  // the scaled gradient written back, as ATen's kernel does
        }
        if (decay_f != 0) p -= lr_f * decay_f * p;
        const float m = std::fma(beta1_f, exp_avg[i], std::fma(-beta1_f, g, g));
        const float v = std::fma(beta2_f, exp_avg_sq[i], std::fma(-beta2_f, g * g, g * g));
        p -= step_size * m / (std::sqrt(v) / bias_correction2_sqrt + eps_f);
        param[i] = p;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
      }
      copy[i] = static_cast<copy_t>(p);
    }
  }
};

}  // namespace titan::cuda::detail
