#pragma once
// titan/fused.hpp: titan's fused operators, for what ATen does not fuse.
//
//   auto loss = titan::cross_entropy(logits, labels, titan::CrossEntropyOptions().reduction(at::Reduction::Sum));
//   auto hidden = titan::swiglu(w1(x), w3(x));    // silu(w1 x) * w3 x, SwiGLU's gate
//   auto [q_rotated, k_rotated] = titan::rope(q, k, cos, sin);   // rotary embedding of q and k
//   auto [h, normed] = titan::add_rms_norm(x, attention_out, weight, eps);   // residual add + RMSNorm
//   auto qkv = titan::linear_fused(x, {wq->weight, wk->weight, wv->weight});  // q, k, v by one GEMM
//   titan::adamw_copy_(params, grads, exp_avgs, exp_avg_sqs, bf16_copies, steps, options);  // AdamW + bf16 copy
//   auto y = titan::moe_combine(expert_out, weights, dispatch.slot, tokens, k);  // MoE: weigh, sum each token's k
//   auto [data, scale] = titan::float8_cast(x, amax, at::kFloat8_e4m3fn, false);  // float8 with its dynamic scale
//
// Each but titan::linear_fused is a dispatcher operator in the namespace `titan`
// (titan::cross_entropy, titan::rope, titan::swiglu, titan::add_rms_norm, titan::moe_combine with
// autograd; titan::adamw_copy_, an optimizer step; titan::float8_cast, float8 training's cast),
// registered on first use (a function-local static; nothing at static-initialisation time). Its
// ATen implementation is the CPU path, the path of any device without a titan kernel, and the
// tests' reference. CUDA kernels are `.cuh` headers under titan/fused/cuda/, compiled by nvcc into
// the `titan::cuda_kernels` target where CUDA is found, and used once a program calls
// titan::cuda::register_kernels() (titan/fused/cuda/kernels.hpp); docs/fused.md says which have
// run on a GPU. titan::linear_fused is autograd around ATen's GEMMs alone, with no kernel of its own.

#include <titan/fused/adamw.hpp>
#include <titan/fused/add_rms_norm.hpp>
#include <titan/fused/cross_entropy.hpp>
#include <titan/fused/float8_cast.hpp>
#include <titan/fused/linear.hpp>
#include <titan/fused/moe_combine.hpp>
#include <titan/fused/rope.hpp>
#include <titan/fused/swiglu.hpp>
