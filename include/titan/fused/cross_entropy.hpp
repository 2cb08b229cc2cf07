#pragma once
// titan/fused/cross_entropy.hpp: cross entropy that writes the logits' gradient during the
// forward (Liger-Kernel's approach), so that neither fp32 logits nor log-probabilities of the
// whole batch are ever in memory.
//
// For rows of logits x [N, V] and targets t [N] (t = ignore_index: no loss, no gradient):
//
//   lse_i  = log sum_v exp(x_iv)                              (in fp32, or fp64 for fp64 logits)
//   loss   = sum_i (lse_i - x_i,t_i)                          (over the rows not ignored)
//   dx_iv  = exp(x_iv - lse_i) - [v = t_i]                     (d loss / d x, 0 in ignored rows)
//
// The forward returns the loss and keeps dx (times the options' grad_scale) in the logits' dtype;
// the backward scales it in place by the incoming gradient / grad_scale, and not at all when that
// is exactly 1: a caller that backpropagates loss * s and passes grad_scale(s) (titan's trainer
// does) spends no pass over dx in the backward (a graph through titan::cross_entropy is
// backpropagated once). The
// ATen implementation works through row chunks of at most `chunk_elements` logits, one chunk in
// fp32 at a time: upcast, log_softmax, exp and the cast of dx (with the backward's scale, 32
// bytes of memory traffic per bf16 logit against about 36 for upcast + log_softmax + nll_loss and
// their backwards, and one chunk in fp32 instead of four whole [N, V] fp32 tensors). The CUDA
// kernel (titan/fused/cuda/cross_entropy.cuh) does a row per block: it reads the logits twice and
// writes dx once (10 bytes per bf16 logit with the backward's scale).

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_log_softmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/div.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/api/include/torch/arg.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>

namespace titan {

/// Options of titan::cross_entropy.
struct CrossEntropyOptions {
  /// Targets equal to this value contribute no loss and no gradient.
  TORCH_ARG(int64_t, ignore_index) = -100;
  /// Mean (over the targets not ignored; NaN if there are none, as at::cross_entropy) or Sum.
  TORCH_ARG(at::Reduction::Reduction, reduction) = at::Reduction::Mean;
  /// Most logits the ATen implementation upcasts at once (whole rows, at least one): 2^27, i.e.
  /// 512 MiB of fp32, about 1,000 tokens of a 128k vocabulary.
  TORCH_ARG(int64_t, chunk_elements) = int64_t{1} << 27;
  /// The gradient the backward is expected to receive (finite, nonzero), e.g. s when the loss is
  /// backpropagated as loss * s: the forward writes the logits' gradient times it, and the backward
  /// rescales only by incoming / grad_scale, skipping its pass over the [N, V] gradient when that
  /// is exactly 1. The value and the gradient are right for any incoming gradient.
  TORCH_ARG(double, grad_scale) = 1.0;
};

namespace detail {

/// Checks what both cross-entropy operators need: logits [N, V] floating, targets [N] int64 on
/// the same device.
inline void check_cross_entropy_rows(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0), op,
              ": needs logits [N, V] and targets [N], got ", logits.sizes(), " and ", targets.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(logits.device() == targets.device(), op, ": logits are on ", logits.device(), " but targets on ",
              targets.device());
  TORCH_CHECK(logits.size(1) > 0, op, ": the vocabulary (logits' last dimension) is empty");
}

/// On the CPU, rejects a target outside [0, V) that is not ignore_index (no device sync elsewhere:
/// CUDA's kernel asserts on the device, as at::cross_entropy's does).
inline void check_cross_entropy_targets(const at::Tensor& targets, int64_t vocab, int64_t ignore_index,
                                        const char* op) {
  if (!targets.device().is_cpu()) return;
  const auto bad = targets.ne(ignore_index).logical_and(targets.lt(0).logical_or(targets.ge(vocab)));  // [N]
  if (!bad.any().item<bool>()) return;
  const int64_t row = bad.nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK(false, op, ": target ", targets[row].item<int64_t>(), " of row ", row, " is outside the vocabulary [0, ",
              vocab, ") and is not ignore_index (", ignore_index, ")");
}

/// titan::cross_entropy_loss_and_grad in ATen (the CPU path and the reference): the loss sum []
/// (fp32, or fp64 for fp64 logits) and, if compute_grad, grad_scale * d loss / d logits [N, V] in
/// the logits' dtype (else an empty tensor).
inline std::tuple<at::Tensor, at::Tensor> cross_entropy_loss_and_grad_aten(const at::Tensor& logits,
                                                                          const at::Tensor& targets,
                                                                          int64_t ignore_index,
                                                                          int64_t chunk_elements, bool compute_grad,
                                                                          double grad_scale) {
  constexpr const char* op = "titan::cross_entropy";
  check_cross_entropy_rows(logits, targets, op);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_cross_entropy_targets(targets, vocab, ignore_index, op);
  const auto compute = at::promote_types(logits.scalar_type(), at::kFloat);
  const auto ignored = targets.eq(ignore_index);                        // [N]
  const auto safe = targets.masked_fill(ignored, 0).unsqueeze(1);       // [N, 1] a valid index in every row
  const auto kept = ignored.logical_not().to(compute).unsqueeze(1);     // [N, 1] 1, or 0 where ignored
  const auto minus_kept = compute_grad ? kept.neg() : kept;             // [N, 1]
  const auto kept_scaled = grad_scale == 1.0 ? kept : kept.mul(grad_scale);  // [N, 1] grad_scale, or 0
  auto picked = at::empty({rows, 1}, logits.options().dtype(compute));  // [N, 1] log p(target)
  auto grad = compute_grad ? at::empty({rows, vocab}, logits.options()) : at::empty({0}, logits.options());  // [N, V]
  const int64_t step = std::max<int64_t>(1, chunk_elements / vocab);
  for (int64_t first = 0; first < rows; first += step) {
    const int64_t n = std::min(step, rows - first);
    auto log_probs = at::_log_softmax(logits.narrow(0, first, n).to(compute), 1, false);  // [n, V]
    auto picked_rows = picked.narrow(0, first, n);                                         // [n, 1]
    at::gather_out(picked_rows, log_probs, 1, safe.narrow(0, first, n));
    if (!compute_grad) continue;
    // (softmax - one_hot(target)) * grad_scale in the rows kept, cast to the logits' dtype as it
    // is written.
    log_probs.exp_().scatter_add_(1, safe.narrow(0, first, n), minus_kept.narrow(0, first, n));
    auto rows_grad = grad.narrow(0, first, n);  // [n, V]
    at::mul_out(rows_grad, log_probs, kept_scaled.narrow(0, first, n));
  }
  auto loss = picked.squeeze(1).masked_fill(ignored, 0).sum().neg();  // []
  return {loss, grad};
}

/// titan::cross_entropy_rescale_grad_ in ATen: multiplies `grad` in place by grad_output /
/// grad_scale (in the gradient's compute dtype), unless that is exactly 1. Only on the CPU can
/// the host read the factor without a device sync; elsewhere the multiply always runs (titan's
/// CUDA kernel makes the same test on the device).
inline void cross_entropy_rescale_grad_aten(at::Tensor& grad, const at::Tensor& grad_output, double grad_scale) {
  const auto factor = at::div(grad_output, grad_scale);  // [] in the loss's dtype
  if (factor.device().is_cpu() && factor.item<double>() == 1.0) return;
  grad.mul_(factor);
}

/// The typed handle of titan::cross_entropy_loss_and_grad (registered by then).
inline auto cross_entropy_loss_and_grad_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("titan::cross_entropy_loss_and_grad", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                       int64_t, bool, double)>();
  return op;
}

/// Autograd of titan::cross_entropy: the gradient comes from the forward.
struct CrossEntropyFunction : torch::autograd::Function<CrossEntropyFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                            int64_t ignore_index, int64_t chunk_elements, double grad_scale) {
    auto [loss, grad] =
        cross_entropy_loss_and_grad_op().call(logits, targets, ignore_index, chunk_elements, true, grad_scale);
    ctx->saved_data["grad"] = grad;  // [N, V] grad_scale * d loss / d logits
    ctx->saved_data["grad_scale"] = grad_scale;
    return loss;  // []
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static const auto rescale = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("titan::cross_entropy_rescale_grad_", "")
                                    .typed<void(at::Tensor&, const at::Tensor&, double)>();
    auto saved = ctx->saved_data.find("grad");
    TORCH_CHECK(saved != ctx->saved_data.end(),
                "titan::cross_entropy: the backward ran twice (retain_graph): its gradient was computed in the "
                "forward and is scaled in place by the first backward; run the forward again");
    auto grad = saved->second.toTensor();  // [N, V]
    ctx->saved_data.erase(saved);          // this node held the only reference: scale it in place
    rescale.call(grad, grad_outputs[0], ctx->saved_data["grad_scale"].toDouble());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

/// titan::cross_entropy's kernel (CompositeImplicitAutograd): the loss sum, differentiable in the
/// logits when they require grad.
inline at::Tensor cross_entropy_kernel(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                       int64_t chunk_elements, double grad_scale) {
  if (at::GradMode::is_enabled() && logits.requires_grad())
    return CrossEntropyFunction::apply(logits, targets, ignore_index, chunk_elements, grad_scale);
  return std::get<0>(
      cross_entropy_loss_and_grad_op().call(logits, targets, ignore_index, chunk_elements, false, grad_scale));
}

}  // namespace detail

/// Registers titan::cross_entropy, titan::cross_entropy_loss_and_grad and
/// titan::cross_entropy_rescale_grad_ with the dispatcher once per process (titan::cross_entropy
/// calls it; call it before naming them elsewhere, e.g. in an activation-checkpointing policy).
/// CUDA kernels registered for the last two (titan::cuda_kernels) take precedence over the ATen
/// implementation on CUDA tensors.
inline void register_cross_entropy_operators() {
  static const std::unique_ptr<torch::Library> library = [] {
    auto lib = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "titan", std::nullopt,
                                                "titan/fused/cross_entropy.hpp", __LINE__);
    lib->def(
        "cross_entropy_loss_and_grad(Tensor logits, Tensor targets, int ignore_index, int chunk_elements, "
        "bool compute_grad, float grad_scale) -> (Tensor, Tensor)");
    lib->def("cross_entropy_rescale_grad_(Tensor(a!) grad, Tensor grad_output, float grad_scale) -> ()");
    lib->def(
        "cross_entropy(Tensor logits, Tensor targets, int ignore_index, int chunk_elements, float grad_scale) -> "
        "Tensor");
    lib->impl("cross_entropy_loss_and_grad",
              torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                              TORCH_FN(detail::cross_entropy_loss_and_grad_aten)));
    lib->impl("cross_entropy_rescale_grad_",
              torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                              TORCH_FN(detail::cross_entropy_rescale_grad_aten)));
    lib->impl("cross_entropy",
              torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(detail::cross_entropy_kernel)));
    return lib;
  }();
  (void)library;
}

/// Cross entropy of logits [..., V] (fp32, bf16, fp16 or fp64) against class targets [...]
/// (integer), computed in fp32 (fp64 for fp64 logits) and returned in that dtype: the value of
/// at::cross_entropy(logits.to(fp32), targets) with options' ignore_index and reduction, without
/// the fp32 copy, the log-probabilities or their gradient in memory. The gradient w.r.t. the logits
/// is computed in the forward (kept in the logits' dtype) and scaled by the backward, which may
/// run once.
inline at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                const CrossEntropyOptions& options = {}) {
  register_cross_entropy_operators();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("titan::cross_entropy", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double)>();
  TORCH_CHECK(logits.dim() >= 1 && targets.dim() == logits.dim() - 1 &&
                  targets.sizes() == logits.sizes().slice(0, logits.dim() - 1),
              "titan::cross_entropy: needs logits [..., V] and targets [...] with the same leading sizes, got ",
              logits.sizes(), " and ", targets.sizes());
  TORCH_CHECK(!at::isFloatingType(targets.scalar_type()) && targets.scalar_type() != at::kBool,
              "titan::cross_entropy: targets must be class indices (an integer dtype), got ", targets.scalar_type());
  TORCH_CHECK(options.reduction() == at::Reduction::Sum || options.reduction() == at::Reduction::Mean,
              "titan::cross_entropy: reduction must be Sum or Mean (the loss is reduced where it is computed), got ",
              static_cast<int64_t>(options.reduction()));
  TORCH_CHECK(options.chunk_elements() > 0, "titan::cross_entropy: chunk_elements must be positive, got ",
              options.chunk_elements());
  TORCH_CHECK(std::isfinite(options.grad_scale()) && options.grad_scale() != 0.0,
              "titan::cross_entropy: grad_scale must be finite and nonzero (the gradient the backward expects), got ",
              options.grad_scale());
  const auto rows = targets.reshape({-1}).to(at::kLong);  // [N]
  auto sum = op.call(logits.reshape({-1, logits.size(-1)}), rows, options.ignore_index(), options.chunk_elements(),
                     options.grad_scale());
  if (options.reduction() == at::Reduction::Sum) return sum;  // []
  return sum.div(rows.ne(options.ignore_index()).sum());      // [] (NaN when every target is ignored)
}

}  // namespace titan
