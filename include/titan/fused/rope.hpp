#pragma once
// titan/fused/rope.hpp: rotary position embedding (RoPE) of the queries and keys together, one
// operator each way.
//
//   (q', k') = titan::rope(q [B, S, Hq, D], k [B, S, Hk, D], cos [S, D/2], sin [S, D/2])
//
// Meta's layout (Llama's reference code, torchtitan): each head's element pairs (x[2i], x[2i+1])
// are rotated by the angle of their position s and frequency i, cos = cos(theta_si), sin = sin(theta_si):
//
//   x'[2i]   = x[2i] cos - x[2i+1] sin          the complex product (x[2i] + i x[2i+1]) (cos + i sin)
//   x'[2i+1] = x[2i] sin + x[2i+1] cos
//
// in fp32 (fp64 for fp64 inputs), rounded to the input's dtype. The backward rotates the gradient
// by -theta; the operator saves only cos and sin (no activation). The ATen implementation is one
// complex multiply per tensor (torchtitan's formulation: the upcast, the product, the cast back);
// the CUDA kernel (titan/fused/cuda/rope.cuh) rotates q and k in one pass (4 bytes per bf16
// element each way, against 16 for the casts and the complex product).

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/complex.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/view_as_complex.h>
#include <ATen/ops/view_as_real.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <memory>
#include <tuple>

namespace titan {
namespace detail {

/// Checks what RoPE needs: q [B, S, Hq, D] and k [B, S, Hk, D] of one floating dtype, D even,
/// cos and sin [S, D/2] floating, all on one device.
inline void check_rope_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(3) == k.size(3) && q.size(3) % 2 == 0,
              "titan::rope: needs q [B, S, Hq, D] and k [B, S, Hk, D] with the same B, S and an even head size D, got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && at::isFloatingType(q.scalar_type()),
              "titan::rope: q and k must have the same floating dtype, got ", q.scalar_type(), " and ",
              k.scalar_type());
  const std::vector<int64_t> table{q.size(1), q.size(3) / 2};
  TORCH_CHECK(cos.sizes() == table && sin.sizes() == table, "titan::rope: cos and sin must be [S, D/2] = ",
              at::IntArrayRef(table),
              " (one row per position of q and k), got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(at::isFloatingType(cos.scalar_type()) && at::isFloatingType(sin.scalar_type()),
              "titan::rope: cos and sin must be floating point, got ", cos.scalar_type(), " and ", sin.scalar_type());
  TORCH_CHECK(k.device() == q.device() && cos.device() == q.device() && sin.device() == q.device(),
              "titan::rope: q, k, cos and sin must be on one device, got ", q.device(), ", ", k.device(), ", ",
              cos.device(), " and ", sin.device());
}

/// The rotations cos + i sin as [1, S, 1, D/2] complex numbers of x's compute precision
/// (complex64, complex128 for fp64), conjugated for the backward's rotation by -theta.
inline at::Tensor rope_rotation(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  const auto real = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto rotation = at::complex(cos.to(real), sin.to(real)).view({1, cos.size(0), 1, cos.size(1)});  // [1, S, 1, D/2]
  return inverse ? rotation.conj() : rotation;
}

/// x [B, S, H, D] rotated pairwise by `rotation` [1, S, 1, D/2] (complex), in x's dtype.
inline at::Tensor rope_rotate(const at::Tensor& x, const at::Tensor& rotation) {
  const auto real = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto values = x.to(real).contiguous();                       // [B, S, H, D]
  if (values.storage_offset() % 2 != 0) values = values.clone();  // complex views start at even offsets
  auto pairs = at::view_as_complex(values.unflatten(-1, {-1, 2}));  // [B, S, H, D/2] complex
  return at::view_as_real(at::mul(pairs, rotation)).flatten(-2).to(x.scalar_type());  // [B, S, H, D]
}

/// titan::rope_forward in ATen: (q', k').
inline std::tuple<at::Tensor, at::Tensor> rope_forward_aten(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& cos, const at::Tensor& sin) {
  check_rope_inputs(q, k, cos, sin);
  const auto rotation = rope_rotation(q, cos, sin, /*inverse=*/false);  // [1, S, 1, D/2]
  return {rope_rotate(q, rotation), rope_rotate(k, rotation)};
}

/// titan::rope_backward in ATen: the gradients of q and k, the output gradients rotated by -theta
/// (what autograd computes for rope_forward_aten's operators, bit for bit).
inline std::tuple<at::Tensor, at::Tensor> rope_backward_aten(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                             const at::Tensor& cos, const at::Tensor& sin) {
  check_rope_inputs(grad_q, grad_k, cos, sin);  // the gradients have q's and k's shapes
  const auto rotation = rope_rotation(grad_q, cos, sin, /*inverse=*/true);  // [1, S, 1, D/2]
  return {rope_rotate(grad_q, rotation), rope_rotate(grad_k, rotation)};
}

/// Autograd of titan::rope: saves cos and sin only.
struct RopeFunction : torch::autograd::Function<RopeFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("titan::rope_forward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&)>();
    TORCH_CHECK(!cos.requires_grad() && !sin.requires_grad(),
                "titan::rope: cos and sin must not require a gradient (the operator computes none for them; "
                "detach them, or compute the rotation with ATen operators to learn the frequencies)");
    ctx->save_for_backward({cos, sin});
    auto [q_out, k_out] = op.call(q, k, cos, sin);
    return {q_out, k_out};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("titan::rope_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    auto [d_q, d_k] = op.call(grad_outputs[0].contiguous(), grad_outputs[1].contiguous(), saved[0], saved[1]);
    return {d_q, d_k, at::Tensor(), at::Tensor()};
  }
};

/// titan::rope's kernel (CompositeImplicitAutograd).
inline std::tuple<at::Tensor, at::Tensor> rope_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                      const at::Tensor& sin) {
  auto out = RopeFunction::apply(q, k, cos, sin);
  return {out[0], out[1]};
}

}  // namespace detail

/// Registers titan::rope, titan::rope_forward and titan::rope_backward with the dispatcher once per
/// process (titan::rope calls it; call it before naming them elsewhere). CUDA kernels registered
/// for the last two (titan::cuda_kernels) take precedence on CUDA tensors.
inline void register_rope_operators() {
  static const std::unique_ptr<torch::Library> library = [] {
    auto lib = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "titan", std::nullopt,
                                                "titan/fused/rope.hpp", __LINE__);
    lib->def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
    lib->def("rope_forward(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
    lib->def("rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
    lib->impl("rope", torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(detail::rope_kernel)));
    lib->impl("rope_forward",
              torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(detail::rope_forward_aten)));
    lib->impl("rope_backward",
              torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(detail::rope_backward_aten)));
    return lib;
  }();
  (void)library;
}

/// Rotary position embedding of q [B, S, Hq, D] and k [B, S, Hk, D] (Meta's interleaved pairs)
/// by the angles whose cosines and sines are cos and sin [S, D/2] (row s: position s of q and k;
/// any floating dtype), computed in fp32 (fp64 for fp64) and returned in q's dtype, with autograd
/// for q and k (none for the tables).
inline std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                               const at::Tensor& sin) {
  register_rope_operators();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("titan::rope", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&)>();
  return op.call(q, k, cos, sin);
}

}  // namespace titan
