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
/// each still close to the exact value.
inline bool as_close_as(const at::Tensor& got, const at::Tensor& want, const at::Tensor& exact, at::ScalarType dtype) {
  const auto e = exact.to(at::kDouble).cpu();
  const auto got_error = (got.to(at::kDouble).cpu() - e).abs(), want_error = (want.to(at::kDouble).cpu() - e).abs();
  return got_error.le(want_error + e.abs() * rounding_unit(dtype) + 1e-6).all().item<bool>();
}

/// as_close_as for sums of many terms (a dot product over a row) that a kernel adds in fp32 in
/// another order than ATen: also up to one fp32 rounding of `magnitude`, the sum of the terms'
/// magnitudes, which bounds what a sum's order can change where its terms cancel (the exact value
/// then being far smaller than they are).
inline bool sum_as_close_as(const at::Tensor& got, const at::Tensor& want, const at::Tensor& exact,
                            const at::Tensor& magnitude, at::ScalarType dtype) {
  const auto e = exact.to(at::kDouble).cpu();
  const auto got_error = (got.to(at::kDouble).cpu() - e).abs(), want_error = (want.to(at::kDouble).cpu() - e).abs();
  const auto slack =
      e.abs() * rounding_unit(dtype) + magnitude.to(at::kDouble).cpu() * rounding_unit(at::kFloat) + 1e-6;
  return got_error.le(want_error + slack).all().item<bool>();
}

/// A contiguous copy of `t` that starts one element past a 16-byte boundary (on t's device).
inline at::Tensor shifted(const at::Tensor& t) {
  auto buffer = at::empty({t.numel() + 1}, t.options());  // allocations start at 16-byte boundaries
  auto copy = buffer.narrow(0, 1, t.numel()).view(t.sizes());
  copy.copy_(t);
  return copy;
}

}  // namespace titan_test
