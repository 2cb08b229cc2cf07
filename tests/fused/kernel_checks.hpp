#pragma once
// What the fused-operator suites (fused_testing.hpp) and the CUDA kernels' emulated suite check of
// a kernel: how close its result must be to a reference, in roundings of the dtype (and of a sum's
// magnitude, for sums whose order differs), and inputs
// placed off a 16-byte boundary (where the kernels take one element at a time, not packs).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

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

/// `t`'s bits as integers of its element size, on the CPU and contiguous: for comparing float8
/// tensors (no at::equal) and tensors holding NaN.
inline at::Tensor bits_of(const at::Tensor& t) {
  const auto c = t.cpu().contiguous();
  const auto size = c.element_size();
  return c.view(size == 1 ? at::kByte : size == 2 ? at::kShort : size == 4 ? at::kInt : at::kLong);
}

/// Whether `got` and `want` hold the same bits wherever `want` is not NaN, and NaN where it is (a
/// NaN's sign and payload differ between ATen's vectorized CPU kernels and scalar code).
inline bool same_bits_or_nan(const at::Tensor& got, const at::Tensor& want) {
  const auto nan = want.cpu().to(at::kFloat).isnan();
  return got.sizes() == want.sizes() && got.cpu().to(at::kFloat).isnan().equal(nan) &&
         bits_of(got).masked_fill(nan, 0).equal(bits_of(want).masked_fill(nan, 0));
}

/// titan::float8_cast computed element by element in scalar C++, no ATen kernel: each amax
/// entry's scale float8_max / max(amax, 1e-12) in fp64 (NaN kept), rounded to fp32 (then to
/// 2^floor(log2) when `power_of_2`), and each element's fp32 product with its scale clamped to
/// ±float8_max (NaN kept) and rounded by c10's float8 conversion; the inverse 1 / scale in fp32.
/// (data [hp's shape, contiguous], scale, inverse [amax's shape, fp32]) on the CPU.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> float8_cast_reference(const at::Tensor& hp,
                                                                            const at::Tensor& amax,
                                                                            at::ScalarType dtype, bool power_of_2) {
  const double max = dtype == at::kFloat8_e4m3fn ? 448.0 : 57344.0;
  const auto a = amax.to(at::kDouble).cpu().contiguous();
  auto scale = at::empty(amax.sizes(), at::kFloat), inverse = at::empty(amax.sizes(), at::kFloat);
  for (int64_t i = 0; i < a.numel(); ++i) {
    double v = a.data_ptr<double>()[i];
    v = std::isnan(v) ? v : std::max(v, 1e-12);
    float s = static_cast<float>((1.0 / v) * max);
    if (power_of_2) s = std::exp2(std::floor(std::log2(s)));
    scale.data_ptr<float>()[i] = s;
    inverse.data_ptr<float>()[i] = 1.f / s;
  }
  const auto x = hp.cpu().to(at::kFloat).contiguous();
  const auto s = scale.expand(hp.sizes()).contiguous();
  auto data = at::empty(hp.sizes(), at::TensorOptions().dtype(dtype));
  for (int64_t i = 0; i < x.numel(); ++i) {
    float v = x.data_ptr<float>()[i] * s.data_ptr<float>()[i];
    v = std::isnan(v) ? v : std::min(std::max(v, static_cast<float>(-max)), static_cast<float>(max));
    if (dtype == at::kFloat8_e4m3fn)
      data.data_ptr<c10::Float8_e4m3fn>()[i] = c10::Float8_e4m3fn(v);
    else
      data.data_ptr<c10::Float8_e5m2>()[i] = c10::Float8_e5m2(v);
  }
  return {data, scale, inverse};
}

/// hp's amax [] in hp's dtype, or along `dim` with keepdim (float8 training's, titan/float8.hpp),
/// divided by `shrink` (> 1: amax below the largest |hp|, so that the cast saturates).
inline at::Tensor float8_amax(const at::Tensor& hp, std::optional<int64_t> dim, double shrink = 1.0) {
  const auto amax = dim ? at::linalg_vector_norm(hp, INFINITY, std::vector<int64_t>{*dim}, /*keepdim=*/true)
                        : at::linalg_vector_norm(hp, INFINITY);
  return shrink == 1.0 ? amax : amax / shrink;
}

}  // namespace titan_test
