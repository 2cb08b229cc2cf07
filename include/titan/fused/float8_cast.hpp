#pragma once
// titan/fused/float8_cast.hpp: a float8 cast with its dynamic scale, as one operator.
//
//   auto [data, scale, inverse] = titan::float8_cast(hp, amax, at::kFloat8_e4m3fn, /*power_of_2=*/false);
//
//   scale   = float8_max / max(amax, 1e-12)   in fp64, rounded to fp32 (then down to a power of two
//                                             when asked: 2^floor(log2(scale)))
//   inverse = 1 / scale                       fp32: what _scaled_mm multiplies its product by
//   data    = saturate(hp · scale)            the product in fp32, clamped to ±float8_max, rounded
//                                             to float8 (e4m3fn: 448, e5m2: 57344)
//
// `amax` is hp's absolute maximum (one element: one scale for the tensor) or, with hp's number of
// dimensions, the maximum along some of them (keepdim: [rows, 1] or [1, cols], a scale per row or
// column); `scale` and `inverse` have amax's shape, `data` hp's shape and strides. NaN propagates (a
// NaN amax gives a NaN scale and NaN data). This is float8 training's cast (titan/float8.hpp,
// torchao's hp_tensor_to_float8_dynamic and the reciprocal its matmul takes): six ATen kernels on
// the scale and four for the cast, which moves 27 bytes per bf16 element through fp32 copies. The
// ATen implementation runs those kernels (the CPU path and the reference: the values of torchao's
// cast); the CUDA kernel (titan/fused/cuda/float8_cast.cuh) is one pass that computes the scale in
// each thread and moves 3 bytes per bf16 element.
//
//   auto [rows, columns, scale, inverse] =
//       titan::float8_cast_transpose(dy, amax, at::kFloat8_e5m2, false, /*row_major=*/true, /*column_major=*/true);
//
// casts a 2-D hp the same way and writes the values in the layouts asked for: row-major,
// column-major or both, whatever hp's own layout (a float8 matmul takes a row-major and a
// column-major operand, and dy of a linear layer's backward is both). The ATen implementation
// copies titan::float8_cast's data into each layout; the CUDA kernel reads hp once through a
// shared-memory tile and writes each layout from it.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/exp2.h>
#include <ATen/ops/floor.h>
#include <ATen/ops/log2.h>
#include <torch/library.h>

#include <memory>
#include <tuple>

namespace titan {
namespace detail {

/// The largest finite value of a float8 dtype: 448 (e4m3fn) or 57344 (e5m2).
inline double float8_max(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2, "titan float8: unsupported dtype ", dtype,
              "; expected Float8_e4m3fn or Float8_e5m2");
  return dtype == at::kFloat8_e4m3fn ? 448.0 : 57344.0;
}

/// The scale for `amax` (any float dtype, any shape): float8_max / max(amax, 1e-12) computed in
/// float64 as torchao does (reciprocal, then product), float32, optionally rounded down to 2^k.
inline at::Tensor amax_to_scale(const at::Tensor& amax, at::ScalarType dtype, bool power_of_2) {
  auto scale = amax.to(at::kDouble).clamp_min(1e-12).reciprocal().mul(float8_max(dtype)).to(at::kFloat);
  return power_of_2 ? at::exp2(at::floor(at::log2(scale))) : scale;
}

/// saturate(hp · scale) in `dtype` (the scale broadcasts: 0-dim or keepdim axiswise).
inline at::Tensor cast_with_scale(const at::Tensor& hp, const at::Tensor& scale, at::ScalarType dtype) {
  const double max = float8_max(dtype);
  return hp.to(at::kFloat).mul(scale).clamp(-max, max).to(dtype);
}

/// Checks what titan::float8_cast needs: a floating hp that is not float8, a float8 target dtype,
/// and an amax of one element or of hp's dimensions (each 1 or hp's size), on hp's device.
inline void check_float8_cast(const at::Tensor& hp, const at::Tensor& amax, at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(hp.scalar_type()) && !at::isFloat8Type(hp.scalar_type()),
              "titan::float8_cast: the tensor to cast must be fp64, fp32, fp16 or bf16, got ", hp.scalar_type());
  TORCH_CHECK(at::isFloatingType(amax.scalar_type()), "titan::float8_cast: amax must be floating, got ",
              amax.scalar_type());
  float8_max(dtype);  // names an unsupported target dtype
  bool broadcasts = amax.numel() == 1 || amax.dim() == hp.dim();
  for (int64_t d = 0; broadcasts && amax.numel() != 1 && d < hp.dim(); ++d)
    broadcasts = amax.size(d) == 1 || amax.size(d) == hp.size(d);
  TORCH_CHECK(broadcasts, "titan::float8_cast: amax of shape ", amax.sizes(), " does not fit a tensor of shape ",
              hp.sizes(), " (expected one element, or the maximum along some dimensions with keepdim)");
  TORCH_CHECK(amax.device() == hp.device(), "titan::float8_cast: the tensor is on ", hp.device(), " but amax on ",
              amax.device());
}

/// titan::float8_cast in ATen: (data, scale, inverse) from amax_to_scale, cast_with_scale and the
/// scale's reciprocal.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> float8_cast_aten(const at::Tensor& hp, const at::Tensor& amax,
                                                                       at::ScalarType dtype, bool power_of_2) {
  check_float8_cast(hp, amax, dtype);
  auto scale = amax_to_scale(amax, dtype, power_of_2);              // amax's shape, fp32
  return {cast_with_scale(hp, scale, dtype), scale, scale.reciprocal()};  // data: hp's shape, float8
}

/// Checks what titan::float8_cast_transpose needs besides titan::float8_cast's: a 2-D hp (a
/// matmul operand) and at least one layout to write.
inline void check_float8_cast_transpose(const at::Tensor& hp, bool row_major, bool column_major) {
  TORCH_CHECK(hp.dim() == 2, "titan::float8_cast_transpose: the tensor to cast must be 2-D (a matmul operand), got ",
              "shape ", hp.sizes());
  TORCH_CHECK(row_major || column_major, "titan::float8_cast_transpose: no layout asked for; expected row_major, ",
              "column_major or both");
}

/// titan::float8_cast_transpose in ATen: titan::float8_cast's values, copied into each layout
/// asked for.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> float8_cast_transpose_aten(
    const at::Tensor& hp, const at::Tensor& amax, at::ScalarType dtype, bool power_of_2, bool row_major,
    bool column_major) {
  check_float8_cast_transpose(hp, row_major, column_major);
  auto [data, scale, inverse] = float8_cast_aten(hp, amax, dtype, power_of_2);  // data: hp's layout
  return {row_major ? data.contiguous() : at::Tensor(), column_major ? data.t().contiguous().t() : at::Tensor(),
          scale, inverse};
}

}  // namespace detail

/// Registers titan::float8_cast and titan::float8_cast_transpose with the dispatcher once per
/// process (both functions call it; call it before naming the operators elsewhere). The CUDA
/// kernels registered for them (titan::cuda_kernels) take precedence on CUDA tensors.
inline void register_float8_cast_operators() {
  static const std::unique_ptr<torch::Library> library = [] {
    auto lib = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "titan", std::nullopt,
                                                "titan/fused/float8_cast.hpp", __LINE__);
    lib->def("float8_cast(Tensor hp, Tensor amax, ScalarType dtype, bool power_of_2) -> (Tensor, Tensor, Tensor)");
    lib->impl("float8_cast", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                             TORCH_FN(detail::float8_cast_aten)));
    lib->def("float8_cast_transpose(Tensor hp, Tensor amax, ScalarType dtype, bool power_of_2, bool row_major, "
             "bool column_major) -> (Tensor, Tensor, Tensor, Tensor)");
    lib->impl("float8_cast_transpose", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd,
                                                       TORCH_FN(detail::float8_cast_transpose_aten)));
    return lib;
  }();
  (void)library;
}

/// `hp` cast to the float8 `dtype` with the dynamic scale of `amax` (see the top of this header):
/// (data [hp's shape and strides], scale and its inverse [amax's shape, fp32]), data ≈ hp · scale.
/// No autograd.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> float8_cast(const at::Tensor& hp, const at::Tensor& amax,
                                                                  at::ScalarType dtype, bool power_of_2) {
  register_float8_cast_operators();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("titan::float8_cast", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                                   at::ScalarType, bool)>();
  return op.call(hp, amax, dtype, power_of_2);
}

/// `hp` (2-D) cast as titan::float8_cast casts it, written row-major, column-major or both: the
/// layouts float8 matmuls take (_scaled_mm: a row-major, b column-major), so that a matmul operand
/// needs no copy of its float8 data, and a tensor that is an operand in both roles (dy of a linear
/// layer's backward) is cast once for both. Returns (row-major data, column-major data [hp's
/// shape; undefined when not asked for], scale, inverse [amax's shape, fp32]). No autograd.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> float8_cast_transpose(
    const at::Tensor& hp, const at::Tensor& amax, at::ScalarType dtype, bool power_of_2, bool row_major,
    bool column_major) {
  register_float8_cast_operators();
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("titan::float8_cast_transpose", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                            at::ScalarType, bool, bool, bool)>();
  return op.call(hp, amax, dtype, power_of_2, row_major, column_major);
}

}  // namespace titan
