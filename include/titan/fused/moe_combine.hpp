#pragma once
// titan/fused/moe_combine.hpp: a mixture-of-experts layer's combine as one operator each way: the
// experts' output rows, each times its routing weight, back with their tokens.
//
//   y = titan::moe_combine(out [N, dim], weight [N] (optional), slot [N], tokens T, k)   -> [T, dim]
//
//   y[t]      = Σ_j round(out[n] · weight[n]),  n the row whose slot is t·k + j   (j ascending; a
//               slot no row has, a dropped assignment, adds nothing; fp32 sum, rounded once)
//   d out[n]  = round(g[t] · weight[n]),        t = slot[n] / k
//   d w[n]    = Σ_d g[t, d] · out[n, d]
//
// round() is to out's dtype; the product is computed in fp32 (weight in fp32, or in out's dtype).
// The slots are the dispatch's (titan::MoeDispatch::slot: distinct, each t·k + j for the j-th
// expert of token t), so no two rows meet and no atomics are needed. Unfused, titan/moe.hpp
// multiplied, cast, wrote the rows into a [T·k, dim] buffer with index_put_ and summed it over k;
// the backward expanded the gradient to [T·k, dim], gathered it and multiplied twice: ~18 bytes per
// bf16 element of `out` forward and ~25 backward. The ATen implementation is those operators
// (bitwise; its backward gathers the gradient's rows directly, the same bits). The CUDA kernel
// (titan/fused/cuda/moe_combine.cuh) reads each row of `out` once and writes y once forward (2.25
// bytes per element at k = 8), and backward writes d out and reduces d w in one pass over g's
// gathered rows and out (6 bytes).

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index.h>
#include <ATen/ops/index_put.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>

namespace titan {
namespace detail {

/// Checks what the combine needs: out [N, dim] floating, weight (when given) [N] floating, slot
/// [N] int64 with N <= tokens·k, all on one device.
inline void check_moe_combine_inputs(const at::Tensor& out, const std::optional<at::Tensor>& weight,
                                     const at::Tensor& slot, int64_t tokens, int64_t k) {
  TORCH_CHECK(out.dim() == 2 && at::isFloatingType(out.scalar_type()),
              "titan::moe_combine: out must be the experts' output rows [N, dim] of a floating dtype, got ",
              out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(tokens >= 0 && k >= 1, "titan::moe_combine: tokens (", tokens, ") must be >= 0 and k (", k,
              ") >= 1");
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == out.size(0) && slot.scalar_type() == at::kLong,
              "titan::moe_combine: slot must be [N] = [", out.size(0), "] int64 (each row's t·k + j), got ",
              slot.sizes(), " ", slot.scalar_type());
  TORCH_CHECK(out.size(0) <= tokens * k, "titan::moe_combine: ", out.size(0), " rows for ", tokens, " tokens of ", k,
              " slots each (at most ", tokens * k, ")");
  TORCH_CHECK(slot.device() == out.device(), "titan::moe_combine: out is on ", out.device(), " but slot on ",
              slot.device());
  if (!weight || !weight->defined()) return;
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == out.size(0) && at::isFloatingType(weight->scalar_type()),
              "titan::moe_combine: weight must be [N] = [", out.size(0), "] of a floating dtype (one routing weight ",
              "per row), got ", weight->sizes(), " ", weight->scalar_type());
  TORCH_CHECK(weight->device() == out.device(), "titan::moe_combine: out is on ", out.device(), " but weight on ",
              weight->device());
}

/// Checks what the combine's backward needs: the forward's inputs, and a gradient [tokens, dim] in
/// out's dtype on its device.
inline void check_moe_combine_grad(const at::Tensor& grad, const at::Tensor& out,
                                   const std::optional<at::Tensor>& weight, const at::Tensor& slot, int64_t k) {
  TORCH_CHECK(grad.dim() == 2 && out.dim() == 2 && grad.size(1) == out.size(1) &&
                  grad.scalar_type() == out.scalar_type() && grad.device() == out.device(),
              "titan::moe_combine: the output gradient must be [tokens, ", out.dim() == 2 ? out.size(1) : -1, "] ",
              out.scalar_type(), " on ", out.device(), ", got ", grad.sizes(), " ", grad.scalar_type(), " on ",
              grad.device());
  check_moe_combine_inputs(out, weight, slot, grad.size(0), k);
}

/// Whether the combine weighs its rows: a weight given (none: score_before_experts).
inline bool weighted(const std::optional<at::Tensor>& weight) { return weight && weight->defined(); }

/// titan::moe_combine_forward in ATen: y [tokens, dim] in out's dtype.
inline at::Tensor moe_combine_forward_aten(const at::Tensor& out, const std::optional<at::Tensor>& weight,
                                           const at::Tensor& slot, int64_t tokens, int64_t k) {
  check_moe_combine_inputs(out, weight, slot, tokens, k);
  const int64_t dim = out.size(1);
  const auto rows = weighted(weight) ? out.mul(weight->unsqueeze(1)).to(out.scalar_type()) : out;  // [N, dim]
  const bool every_slot = out.size(0) == tokens * k;  // dropless: each slot is written once
  auto slots = every_slot ? at::empty({tokens * k, dim}, out.options())
                          : at::zeros({tokens * k, dim}, out.options());  // [T·k, dim]
  slots.index_put_(c10::List<std::optional<at::Tensor>>({slot}), rows);
  return slots.view({tokens, k, dim}).sum(1);  // [T, dim]: fp32 accumulation, rounded once
}

/// titan::moe_combine_backward in ATen: (d out [N, dim], d weight [N] in weight's dtype, undefined
/// without a weight) for the output gradient `grad` [tokens, dim]: autograd's operators through the
/// unfused combine.
inline std::tuple<at::Tensor, at::Tensor> moe_combine_backward_aten(const at::Tensor& grad, const at::Tensor& out,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    const at::Tensor& slot, int64_t k) {
  check_moe_combine_grad(grad, out, weight, slot, k);
  const auto rows = grad.index(c10::List<std::optional<at::Tensor>>({slot.div(k, "floor")}));  // [N, dim]
  if (!weighted(weight)) return {rows, at::Tensor()};
  // The product out · weight was in the promoted dtype, then cast to out's: its gradient in that dtype.
  const auto promoted = rows.to(at::promote_types(out.scalar_type(), weight->scalar_type()));  // [N, dim]
  auto d_out = promoted.mul(weight->unsqueeze(1)).to(out.scalar_type());                         // [N, dim]
  auto d_weight = promoted.mul(out).to(weight->scalar_type()).sum(1);                            // [N]
  return {d_out, d_weight};
}

/// Autograd of titan::moe_combine: saves out, weight and slot.
struct MoeCombineFunction : torch::autograd::Function<MoeCombineFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& out,
                            const std::optional<at::Tensor>& weight, const at::Tensor& slot, int64_t tokens,
                            int64_t k) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("titan::moe_combine_forward", "")
                               .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const at::Tensor&, int64_t, int64_t)>();
    ctx->save_for_backward({out, weight.value_or(at::Tensor()), slot});
    ctx->saved_data["k"] = k;
    return op.call(out, weight, slot, tokens, k);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("titan::moe_combine_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, const at::Tensor&, int64_t)>();
    const auto saved = ctx->get_saved_variables();  // out, weight (undefined: none), slot
    const std::optional<at::Tensor> weight = saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    auto [d_out, d_weight] =
        op.call(grad_outputs[0].contiguous(), saved[0], weight, saved[2], ctx->saved_data["k"].toInt());
    return {d_out, d_weight, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

/// titan::moe_combine's kernel (CompositeImplicitAutograd).
inline at::Tensor moe_combine_kernel(const at::Tensor& out, const std::optional<at::Tensor>& weight,
                                     const at::Tensor& slot, int64_t tokens, int64_t k) {
  return MoeCombineFunction::apply(out, weight, slot, tokens, k);
}

}  // namespace detail

/// Registers titan::moe_combine, titan::moe_combine_forward and titan::moe_combine_backward with
/// the dispatcher once per process (titan::moe_combine calls it; call it before naming them
/// elsewhere). CUDA kernels registered for the last two (titan::cuda_kernels) take precedence on
/// CUDA tensors.
inline void register_moe_combine_operators() {
  static const std::unique_ptr<torch::Library> library = [] {
    auto lib = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "titan", std::nullopt,
                                                "titan/fused/moe_combine.hpp", __LINE__);
    lib->def("moe_combine(Tensor out, Tensor? weight, Tensor slot, int tokens, int k) -> Tensor");
    lib->def("moe_combine_forward(Tensor out, Tensor? weight, Tensor slot, int tokens, int k) -> Tensor");
    lib->def("moe_combine_backward(Tensor grad, Tensor out, Tensor? weight, Tensor slot, int k) -> (Tensor, Tensor)");
    lib->impl("moe_combine",
              torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(detail::moe_combine_kernel)));
    lib->impl("moe_combine_forward", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                                     TORCH_FN(detail::moe_combine_forward_aten)));
    lib->impl("moe_combine_backward", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                                      TORCH_FN(detail::moe_combine_backward_aten)));
    return lib;
  }();
  (void)library;
}

/// A mixture-of-experts combine with autograd: row n of `out` [N, dim] (the experts' outputs, in
/// the dispatch's order), times weight[n] when a weight [N] is given and rounded to out's dtype,
/// added into token slot[n] / k of the result [tokens, dim]; each token's (at most k) rows summed
/// in fp32 in the order of their slots, rounded once. `slot` [N] int64: distinct slots t·k + j
/// (titan::MoeDispatch::slot); a slot no row names (a dropped assignment) adds nothing.
inline at::Tensor moe_combine(const at::Tensor& out, const std::optional<at::Tensor>& weight, const at::Tensor& slot,
                              int64_t tokens, int64_t k) {
  register_moe_combine_operators();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("titan::moe_combine", "")
                             .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                               int64_t, int64_t)>();
  return op.call(out, weight, slot, tokens, k);  // titan::moe_combine_forward checks the inputs
}

}  // namespace titan
