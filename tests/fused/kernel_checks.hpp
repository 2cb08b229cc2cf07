#pragma once
// What the fused-operator suites (fused_testing.hpp) and the CUDA kernels' emulated suite check of
// a kernel: how close its result must be to a reference, in roundings of the dtype (and of a sum's
// magnitude, for sums whose order differs), and inputs
// placed off a 16-byte boundary (where the kernels take one element at a time, not packs).
#include <ATen/ATen.h>

#include <cmath>

namespace titan_test {

/// One rounding in `dtype`, relative: 2^-mantissa (1e-6 for fp32 and fp64).
inline double rounding_unit(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? std::ldexp(1.0, -7) : dtype == at::kHalf ? std::ldexp(1.0, -10) : 1e-6;
}

/// Whether `got` is within one rounding of `want` in `dtype` (relative, plus a floor): a CUDA
/// kernel computing in fp32 and rounding once against PyTorch's operators.
inline bool within_rounding(const at::Tensor& got, const at::Tensor& want, at::ScalarType dtype) {
  const auto error = (got.to(at::kDouble) - want.to(at::kDouble)).abs().cpu();
  return error.le(want.to(at::kDouble).abs().cpu() * rounding_unit(dtype) + 1e-6).all().item<bool>();
}

/// Whether `got` is as close to `exact` (the operators in fp64 on the same inputs) as `want`, the
/// unfused operators' result, is, up to one rounding of `exact` in `dtype`. Where the unfused
/// operators round each step and the steps cancel (a norm's gradient plus the residual's), their
/// result and a kernel's single rounding may differ by far more than a rounding of the result,
/// each still close to the exact value. `extra_slack` (optional, broadcast to `exact`) is allowed on
/// top.
inline bool as_close_as(const at::Tensor& got, const at::Tensor& want, const at::Tensor& exact, at::ScalarType dtype,
                        const at::Tensor& extra_slack = {}) {
  const auto e = exact.to(at::kDouble).cpu();
  const auto got_error = (got.to(at::kDouble).cpu() - e).abs(), want_error = (want.to(at::kDouble).cpu() - e).abs();
  auto slack = e.abs() * rounding_unit(dtype) + 1e-6;
  if (extra_slack.defined()) slack = slack + extra_slack.to(at::kDouble).cpu();
  return got_error.le(want_error + slack).all().item<bool>();
}

/// as_close_as for sums of many terms (a dot product over a row) that a kernel adds in fp32 in
/// another order than ATen: also up to one fp32 rounding of `magnitude`, the sum of the terms'
/// magnitudes, which bounds what a sum's order can change where its terms cancel (the exact value
/// then being far smaller than they are).
inline bool sum_as_close_as(const at::Tensor& got, const at::Tensor& want, const at::Tensor& exact,
                            const at::Tensor& magnitude, at::ScalarType dtype) {
  return as_close_as(got, want, exact, dtype, magnitude.to(at::kDouble) * rounding_unit(at::kFloat));
}

/// The magnitude of titan::moe_combine's weight-gradient terms, Σ_d |grad[slot / k, d] · out[n, d]|
/// per row n [N] (in fp64): what sum_as_close_as allows a sum's order to change.
inline at::Tensor moe_combine_magnitude(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& slot,
                                        int64_t k) {
  const auto rows = grad.to(at::kDouble).index({slot.div(k, "floor")});  // [N, dim]
  return (rows * out.to(at::kDouble)).abs().sum(1);                     // [N]
}

/// A contiguous copy of `t` that starts one element past a 16-byte boundary (on t's device).
inline at::Tensor shifted(const at::Tensor& t) {
  auto buffer = at::empty({t.numel() + 1}, t.options());  // allocations start at 16-byte boundaries
  auto copy = buffer.narrow(0, 1, t.numel()).view(t.sizes());
  copy.copy_(t);
  return copy;
}

}  // namespace titan_test
