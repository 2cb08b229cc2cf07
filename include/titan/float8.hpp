#pragma once
// titan/float8.hpp: float8 training of linear layers (torchao's Float8Linear) and float8
// all-gather of their weights under fully_shard.
//
//   titan::convert_to_float8_training(model, titan::Float8Options()       // before parallelizing
//                                                .recipe(titan::Float8Recipe::Tensorwise)
//                                                .filter_fqns({"output"})
//                                                .enable_fsdp_float8_all_gather(true));
//   ... parallelize_module (TP), activation checkpointing, fully_shard ...
//   loss.backward(); optimizer.step();
//   titan::precompute_float8_dynamic_scale_for_fsdp(model);   // optional: one all-reduce per step
//
// A converted linear layer (y = x Wᵀ + b) computes its three matmuls with float8 operands through
// at::_scaled_mm, each operand cast with a dynamic scale from its current absolute maximum (amax):
//
//   forward      y  = x  · Wᵀ      x, W in e4m3
//   grad input   dx = dy · W       dy in e5m2 (tensorwise) or e4m3 (rowwise), W in e4m3
//   grad weight  dW = dyᵀ · x      dy, x as above (high precision with rowwise_with_gw_hp)
//
//   cast(t) = saturate(t · s) to float8,  s = float8_max / amax(t)   (one s per tensor, or per
//   row / column of the matmul's operand along its contraction dimension for rowwise; rowwise
//   scales are rounded down to powers of two), and _scaled_mm multiplies the result by 1/(s_a s_b).
//
// Master weights, gradients and optimizer state keep their dtype; outputs have the input's dtype;
// state dicts and checkpoints are unchanged (the module's parameters are untouched). Under tensor
// parallelism every amax is reduced across the TP group wherever the operand is split along the
// dimension it is taken over, so the scales (and the values) are those of the unsharded layer.
// With fully_shard and enable_fsdp_float8_all_gather (tensorwise), each rank casts its shard of a
// weight with the scale of the whole weight (the unit's amaxes reduced in one all-reduce, or
// precomputed for the whole model after the optimizer step) and the unit all-gathers float8: half
// of bf16's bytes. The layer then computes from the gathered float8 weight. Numerics follow
// torchao 0.18 (tests compare with it); on the CPU, _scaled_mm takes tensorwise scales only, so
// the rowwise recipes multiply the dequantized float8 values in fp32 there (torchao's emulate).
// See docs/float8.md.

#include <titan/collectives.hpp>
#include <titan/detail/autograd.hpp>
#include <titan/detail/enum_names.hpp>
#include <titan/fsdp.hpp>
#include <titan/fused/float8_cast.hpp>
#include <titan/hooks.hpp>
#include <titan/sharding.hpp>

#include <ATen/ops/_scaled_mm.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/max.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace titan {

/// The scaling recipes, as torchao names them.
enum class Float8Recipe {
  Tensorwise,       ///< one scale per tensor; grad_output in e5m2
  Rowwise,          ///< one scale per row of each operand (along the contraction); power-of-2 scales
  RowwiseWithGwHp,  ///< rowwise, with the weight gradient computed in high precision
};

/// The recipes' names: "tensorwise", "rowwise", "rowwise_with_gw_hp" (torchao's).
inline const detail::EnumNames<Float8Recipe, 3>& float8_recipe_names() {
  static const detail::EnumNames<Float8Recipe, 3> names{{{Float8Recipe::Tensorwise, "tensorwise"},
                                                         {Float8Recipe::Rowwise, "rowwise"},
                                                         {Float8Recipe::RowwiseWithGwHp, "rowwise_with_gw_hp"}}};
  return names;
}

/// The recipe's torchao name.
inline std::string float8_recipe_name(Float8Recipe recipe) { return detail::enum_name(float8_recipe_names(), recipe); }

/// The recipe named `name`; an unknown name is an error listing the known ones.
inline Float8Recipe parse_float8_recipe(const std::string& name) {
  return detail::parse_enum(float8_recipe_names(), name, "titan::parse_float8_recipe: unknown recipe");
}

/// How one operand is cast (torchao's CastConfig).
struct Float8Cast {
  enum class Scaling { Tensorwise, Axiswise, Disabled };
  Scaling scaling = Scaling::Tensorwise;
  at::ScalarType dtype = at::kFloat8_e4m3fn;
};

/// The casts of the three matmuls (torchao's Float8LinearConfig).
struct Float8Casts {
  Float8Cast input, weight, grad_output;      ///< forward, and grad_output of grad_input
  Float8Cast weight_for_grad_input;           ///< W in dx = dy · W
  Float8Cast input_for_grad_weight;           ///< x in dW = dyᵀ · x
  Float8Cast grad_output_for_grad_weight;     ///< dy in dW = dyᵀ · x
  bool round_scales_to_power_of_2 = false;

  /// torchao's Float8LinearConfig.from_recipe_name.
  static Float8Casts of(Float8Recipe recipe) {
    using S = Float8Cast::Scaling;
    const Float8Cast e4m3_tensorwise{S::Tensorwise, at::kFloat8_e4m3fn};
    const Float8Cast e4m3_axiswise{S::Axiswise, at::kFloat8_e4m3fn};
    Float8Casts c;
    switch (recipe) {
      case Float8Recipe::Tensorwise: {
        const Float8Cast e5m2_tensorwise{S::Tensorwise, at::kFloat8_e5m2};
        c.input = c.weight = c.weight_for_grad_input = c.input_for_grad_weight = e4m3_tensorwise;
        c.grad_output = c.grad_output_for_grad_weight = e5m2_tensorwise;
        break;
      }
      case Float8Recipe::Rowwise:
        c.input = c.weight = c.grad_output = e4m3_axiswise;
        c.weight_for_grad_input = c.input_for_grad_weight = c.grad_output_for_grad_weight = e4m3_axiswise;
        c.round_scales_to_power_of_2 = true;
        break;
      case Float8Recipe::RowwiseWithGwHp:
        c.input = c.weight = c.grad_output = e4m3_axiswise;
        c.weight_for_grad_input = e4m3_tensorwise;
        c.input_for_grad_weight = c.grad_output_for_grad_weight = Float8Cast{S::Disabled, at::kFloat8_e4m3fn};
        c.round_scales_to_power_of_2 = true;
        break;
    }
    return c;
  }
};

/// Options of convert_to_float8_training, with chained setters.
struct Float8Options {
  TORCH_ARG(Float8Recipe, recipe) = Float8Recipe::Tensorwise;
  /// Modules whose dotted name contains one of these strings stay in high precision (torchtitan's
  /// filter_fqns; it skips {"output"}, the vocabulary projection).
  TORCH_ARG(std::vector<std::string>, filter_fqns) = {};
  /// Under fully_shard, all-gather the converted weights in float8 (tensorwise recipe only).
  TORCH_ARG(bool, enable_fsdp_float8_all_gather) = false;
  /// Which modules are linear layers: y = x Wᵀ (+ b) from parameters "weight" [out, in] and an
  /// optional "bias" [out]. Default: torch::nn::Linear. A model with its own linear module passes
  /// its type here (titan::is_module<MyLinearImpl>).
  TORCH_ARG(std::function<bool(const torch::nn::Module&)>, is_linear) = [](const torch::nn::Module& m) {
    return dynamic_cast<const torch::nn::LinearImpl*>(&m) != nullptr;
  };
  /// Multiply dequantized float8 values in fp32 instead of calling _scaled_mm (torchao's emulate):
  /// same casts, a high-precision product. Always on for the rowwise recipes on the CPU, whose
  /// _scaled_mm takes tensorwise scales only.
  TORCH_ARG(bool, emulate) = false;
};

/// A predicate for Float8Options::is_linear: modules of type T.
template <typename T>
bool is_module(const torch::nn::Module& module) {
  return dynamic_cast<const T*>(&module) != nullptr;
}

namespace detail {

/// A matmul operand: float8 `data` with its scale and the scale's inverse (0-dim: tensorwise;
/// [rows, 1] or [1, cols]: axiswise), or a high-precision `data` with neither (cast disabled).
struct Float8Operand {
  at::Tensor data;
  at::Tensor scale;         ///< float32; data ≈ value · scale
  at::Tensor inverse;       ///< 1 / scale, what _scaled_mm multiplies by
  at::Tensor amax;          ///< the amax the scale came from (reduced over TP), when cast here
  at::Tensor other_layout;  ///< data's values in the other layout (row- or column-major), when cast in both
  Float8Operand t() const {
    const auto transposed = [&](const at::Tensor& s) { return s.defined() && s.dim() == 2 ? s.t() : s; };
    return {data.t(), transposed(scale), transposed(inverse), transposed(amax), transposed(other_layout)};
  }
  bool axiswise() const { return scale.defined() && scale.dim() == 2; }
};

/// The layouts a cast writes its float8 data in: a float8 matmul (_scaled_mm) takes its first
/// operand row-major and its second column-major; dy of a linear layer's backward is both.
enum class Float8Layout { RowMajor, ColumnMajor, Both };

/// max |hp|: [] or, given `dim`, keepdim along it. On a GPU one reduction kernel (the inf norm:
/// no |hp| tensor written and read back); on the CPU abs then max, which ATen vectorizes (its inf
/// norm is several times slower there). The same values either way, NaN included.
inline at::Tensor abs_max(const at::Tensor& hp, std::optional<int64_t> dim = std::nullopt) {
  if (hp.is_cpu()) {
    if (dim) return at::amax(at::abs(hp), {*dim}, /*keepdim=*/true);
    // A weight's transpose reduced as the weight (the same elements): ATen's CPU max copies a
    // tensor that is not contiguous first.
    const bool transposed = hp.dim() == 2 && !hp.is_contiguous() && hp.t().is_contiguous();
    return at::max(at::abs(transposed ? hp.t() : hp));
  }
  return dim ? at::linalg_vector_norm(hp, INFINITY, std::vector<int64_t>{*dim}, /*keepdim=*/true)
             : at::linalg_vector_norm(hp, INFINITY);
}

/// A weight shard's amax as float32 [] (0 for an empty shard: a rank may hold no rows).
inline at::Tensor shard_amax(const at::Tensor& shard) {
  at::NoGradGuard no_grad;
  return shard.numel() == 0 ? at::zeros({}, shard.options().dtype(at::kFloat)) : abs_max(shard).to(at::kFloat);
}

/// `hp` [rows, cols] cast per `cast` into `layout` (titan::float8_cast_transpose: Both puts the
/// column-major data in other_layout), the axiswise amax taken along `dim`; the amax is reduced
/// (maximum) over `group` when given (the operand is split over it along the amax's dimension). A
/// given `amax` (one this function returned for the same tensor and cast) is used as it is.
inline Float8Operand cast_operand(const at::Tensor& hp, const Float8Cast& cast, int64_t dim, bool power_of_2,
                                  const ProcessGroupPtr& group, Float8Layout layout, at::Tensor amax = {}) {
  if (cast.scaling == Float8Cast::Scaling::Disabled) return {hp, at::Tensor()};
  at::NoGradGuard no_grad;
  if (!amax.defined()) {
    // [] (tensorwise) or keepdim along `dim` (axiswise)
    amax = abs_max(hp, cast.scaling == Float8Cast::Scaling::Tensorwise ? std::nullopt : std::optional(dim));
    if (group && group->size() > 1) amax = all_reduce_raw(amax.to(at::kFloat), *group, ReduceOp::Max);
  }
  auto [rows, columns, scale, inverse] = float8_cast_transpose(
      hp, amax, cast.dtype, power_of_2, layout != Float8Layout::ColumnMajor, layout != Float8Layout::RowMajor);
  if (layout == Float8Layout::ColumnMajor) return {columns, scale, inverse, amax};
  return {rows, scale, inverse, amax, columns};  // columns: undefined unless Both
}

/// Whether two casts of the same tensor give the same float8 values: both tensorwise to one dtype
/// (one amax over the whole tensor, reduced over the same TP group whichever dimension is split).
inline bool same_cast(const Float8Cast& a, const Float8Cast& b) {
  return a.scaling == Float8Cast::Scaling::Tensorwise && b.scaling == Float8Cast::Scaling::Tensorwise &&
         a.dtype == b.dtype;
}

/// Whether the 2-D `t` is row-major: its elements consecutive along each row, its rows apart.
inline bool is_row_major(const at::Tensor& t) { return t.stride(0) > t.stride(1) && t.stride(1) == 1; }

/// An operand's float8 data row-major: its data or its other layout, whichever is; else a copy.
inline at::Tensor row_major_data(const Float8Operand& o) {
  if (is_row_major(o.data)) return o.data;
  if (o.other_layout.defined() && is_row_major(o.other_layout)) return o.other_layout;
  return o.data.contiguous();
}

/// An operand's float8 data column-major: its data or its other layout, whichever is; else a copy.
inline at::Tensor column_major_data(const Float8Operand& o) { return row_major_data(o.t()).t(); }

/// A linear layer's input x [M, K] cast for its forward matmul, shared by the layers reading the
/// same x (titan::call_fused: q, k and v; gate and up) and, where the grad-weight matmul casts x
/// the same way (tensorwise), kept for their backward instead of x: no second amax and cast, one
/// byte per element held instead of x's two or four.
class Float8Input {
 public:
  explicit Float8Input(Float8Operand cast) : cast_(std::move(cast)) {}
  /// The forward's operand (data [M, K] row-major).
  const Float8Operand& forward() const { return cast_; }
  /// After the last forward matmul: where x was also cast column-major (for the backward), the
  /// row-major data is freed.
  void end_forward() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!cast_.other_layout.defined()) return;
    cast_.data = std::move(cast_.other_layout);  // [M, K], strides [1, M]
    cast_.other_layout = at::Tensor();
  }
  /// The same values column-major, as dW = dyᵀ · x takes x: the cast's column-major layout (kept
  /// by end_forward), or copied once, by the first backward that asks.
  Float8Operand for_grad_weight() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (is_row_major(cast_.data)) cast_.data = cast_.data.t().contiguous().t();  // [M, K], strides [1, M]
    return cast_;
  }

 private:
  Float8Operand cast_;
  std::mutex mutex_;
};

/// a · b (a [M, K], b [K, N]) in `out_dtype`, as torchao's float8 mm: _scaled_mm with the inverse
/// scales (a row-major, b column-major; a tensorwise scale repeated when the other is axiswise;
/// rowwise without fast accumulation as a tensorwise product scaled afterwards), or emulated.
inline at::Tensor float8_mm(const Float8Operand& a, const Float8Operand& b, at::ScalarType out_dtype, bool fast_accum,
                            bool emulate) {
  if (!a.scale.defined()) {
    TORCH_CHECK(!b.scale.defined(), "titan float8: internal error: one matmul operand in float8, one not");
    return at::mm(a.data, b.data);
  }
  if (emulate) return at::mm(a.data.to(at::kFloat) / a.scale, b.data.to(at::kFloat) / b.scale).to(out_dtype);
  at::Tensor a_data = row_major_data(a);     // [M, K]
  at::Tensor b_data = column_major_data(b);  // [K, N]
  at::Tensor a_inverse = a.inverse, b_inverse = b.inverse;  // the casts' 1 / scale
  if (!a.axiswise() && b.axiswise()) a_inverse = a_inverse.repeat({a_data.size(0)}).reshape({-1, 1});
  if (a.axiswise() && !b.axiswise()) b_inverse = b_inverse.repeat({b_data.size(1)}).reshape({1, -1});
  const bool rowwise = a_inverse.dim() == 2 && a_inverse.size(0) == a_data.size(0) && a_inverse.size(1) == 1 &&
                       b_inverse.dim() == 2 && b_inverse.size(0) == 1 && b_inverse.size(1) == b_data.size(1);
  at::Tensor post_inverse;
  if (rowwise && !fast_accum) {
    post_inverse = a_inverse * b_inverse;  // [M, N]
    a_inverse = a_inverse.new_ones({});
    b_inverse = a_inverse.new_ones({});
  }
  const bool via_bf16 = rowwise && (out_dtype == at::kFloat || out_dtype == at::kHalf);
  at::Tensor out;
  try {
    out = at::_scaled_mm(a_data, b_data, a_inverse, b_inverse, std::nullopt, std::nullopt,
                         via_bf16 ? at::kBFloat16 : out_dtype, fast_accum);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "titan float8: at::_scaled_mm of ", a_data.sizes(), " x ", b_data.sizes(), " (", a_data.scalar_type(),
                " x ", b_data.scalar_type(), ", ", rowwise ? "rowwise" : "tensorwise", " scales) failed on ",
                a_data.device(), ": ", e.what_without_backtrace(), ". Float8 matmuls need float8 tensor cores (CUDA ",
                "compute capability 8.9 or newer: Ada, Hopper, Blackwell); Float8Options::emulate (float8.emulate) ",
                "runs the same casts without them");
  }
  if (post_inverse.defined()) out.mul_(post_inverse);
  return via_bf16 ? out.to(out_dtype) : out;
}

/// How a converted layer's weight is split by tensor parallelism: which of its matmul dimensions
/// (N = out features, K = in features) is sharded over `group`.
struct Float8TensorParallel {
  enum class Split { None, OutFeatures, InFeatures };
  Split split = Split::None;
  ProcessGroupPtr group;
  /// The group to reduce the amax of an operand with dimensions `dims` (Split::None: the tokens)
  /// over: when the operand is split and its amax is taken along the split dimension (a tensorwise
  /// amax along all of them). A replicated operand (x of a column-parallel layer, dy of a
  /// row-parallel one) has the same amax on every rank: nothing to reduce.
  ProcessGroupPtr reduce_group(const Float8Cast& cast, std::initializer_list<Split> dims, Split along) const {
    if (split == Split::None || cast.scaling == Float8Cast::Scaling::Disabled) return nullptr;
    if (std::find(dims.begin(), dims.end(), split) == dims.end()) return nullptr;
    return cast.scaling == Float8Cast::Scaling::Tensorwise || along == split ? group : nullptr;
  }
};

/// What one float8 linear computes with (fixed per layer).
struct Float8LinearSpec {
  Float8Casts casts;
  bool emulate = false;
  Float8TensorParallel tp;
};

/// The group the amax of a converted layer's input x [tokens, K] is reduced over (nullptr: none).
inline ProcessGroupPtr input_group(const Float8LinearSpec& spec) {
  using Split = Float8TensorParallel::Split;
  return spec.tp.reduce_group(spec.casts.input, {Split::None, Split::InFeatures}, Split::InFeatures);
}

/// Whether a converted layer's backward keeps the forward's cast of x instead of x: its
/// grad-weight matmul casts x as the forward does (tensorwise) and autograd records the layer (x
/// or a weight reading it `requires_grad`).
inline bool keeps_input_cast(const Float8LinearSpec& spec, bool requires_grad) {
  return same_cast(spec.casts.input, spec.casts.input_for_grad_weight) && requires_grad &&
         torch::autograd::GradMode::is_enabled();
}

/// x [..., K] cast for a converted layer's forward matmul, row-major; also column-major (for the
/// backward's dW = dyᵀ · x) when `for_backward`.
inline std::shared_ptr<Float8Input> cast_input(const at::Tensor& x, const Float8LinearSpec& spec, bool for_backward) {
  auto x2 = x.reshape({-1, x.size(-1)});  // [M, K]
  return std::make_shared<Float8Input>(cast_operand(x2, spec.casts.input, -1, spec.casts.round_scales_to_power_of_2,
                                                    input_group(spec),
                                                    for_backward ? Float8Layout::Both : Float8Layout::RowMajor));
}

/// y = x Wᵀ ([..., K] · [N, K]ᵀ → [..., N], x's dtype), differentiable in x and `weight`. `x_cast`:
/// x already cast by cast_input (shared with other layers reading x; the caller ends its
/// forward), or nullptr. With `weight_fp8` (a tensorwise float8 W [N, K] gathered by FSDP) the
/// weight's values are not read: it only receives the gradient. Where the backward casts x or W as
/// the forward did (tensorwise), it reuses the forward's cast of x, and W's cast inside a
/// checkpointed region's recomputation (whose backward follows at once), else W's amax. Each
/// operand is cast into the layout its matmuls take (dy into both), so no float8 data is copied.
inline at::Tensor float8_linear(const at::Tensor& x, std::shared_ptr<Float8Input> x_cast, const at::Tensor& weight,
                                const std::optional<Float8Operand>& weight_fp8, const Float8LinearSpec& spec) {
  using Split = Float8TensorParallel::Split;
  constexpr Split out = Split::OutFeatures, in = Split::InFeatures;  // operand dims
  const auto& c = spec.casts;
  const bool pow2 = c.round_scales_to_power_of_2;
  const int64_t K = x.size(-1);
  const int64_t N = weight.size(0);
  const bool keeps_x = keeps_input_cast(spec, x.requires_grad() || weight.requires_grad());
  const bool same_weight_cast = !weight_fp8 && same_cast(c.weight, c.weight_for_grad_input);
  const bool keeps_weight = same_weight_cast && recomputation_depth() > 0;  // for one region's backward
  at::Tensor y;                              // [..., N]
  std::optional<Float8Operand> weight_cast;  // W's cast [K, N] row-major, kept (keeps_weight)
  at::Tensor weight_amax;                    // else W's amax, kept (same_weight_cast)
  {
    at::NoGradGuard no_grad;
    const bool casts_x = !x_cast;
    if (casts_x) x_cast = cast_input(x, spec, keeps_x);
    // Wᵀ [K, N] column-major for this matmul (Both: in other_layout; data row-major for the backward's)
    auto b = weight_fp8 ? weight_fp8->t()
                        : cast_operand(weight.t(), c.weight, 0, pow2, spec.tp.reduce_group(c.weight, {out, in}, in),
                                       keeps_weight ? Float8Layout::Both : Float8Layout::ColumnMajor);
    auto out_sizes = x.sizes().vec();
    out_sizes.back() = N;
    y = float8_mm(x_cast->forward(), b, x.scalar_type(), /*fast_accum=*/true, spec.emulate).view(out_sizes);
    if (casts_x) x_cast->end_forward();
    if (keeps_weight) {
      b.other_layout = at::Tensor();  // the column-major data this matmul took
      weight_cast = std::move(b);     // the row-major the backward's takes
    } else if (same_weight_cast) {
      weight_amax = b.amax;
    }
  }
  torch::autograd::variable_list outputs{y};
  // By value: the closure outlives this call (it runs in backward). It holds x's cast or x.
  detail::connect_backward(
      {x, weight}, outputs, "titan::Float8LinearBackward",
      [x = keeps_x ? at::Tensor() : x.detach(), x_cast = keeps_x ? std::move(x_cast) : nullptr,
       x_sizes = x.sizes().vec(), weight = weight.detach(), weight_fp8, weight_cast, weight_amax, spec, K,
       N](torch::autograd::variable_list&& grads) {
        using Split = Float8TensorParallel::Split;
        constexpr Split tokens = Split::None, out = Split::OutFeatures, in = Split::InFeatures;
        const auto& c = spec.casts;
        const bool pow2 = c.round_scales_to_power_of_2;
        at::NoGradGuard no_grad;
        auto dy = grads[0].reshape({-1, N});  // [M, N]
        // A tensorwise cast of dy is the same whichever dimension its amax is along: dW = dyᵀ · x
        // reuses dx's (tensorwise: the same amax and group), cast in both layouts at once.
        const bool same_dy_cast = same_cast(c.grad_output, c.grad_output_for_grad_weight);
        // dx = dy · W: dy rowwise along N (row-major), W (as Wᵀ [K, N], row-major) along N.
        auto dy_n = cast_operand(dy, c.grad_output, -1, pow2, spec.tp.reduce_group(c.grad_output, {tokens, out}, out),
                                 same_dy_cast ? Float8Layout::Both : Float8Layout::RowMajor);
        auto w_n = weight_fp8    ? weight_fp8->t()
                   : weight_cast ? *weight_cast
                                 : cast_operand(weight.t(), c.weight_for_grad_input, -1, pow2,
                                                spec.tp.reduce_group(c.weight_for_grad_input, {out, in}, out),
                                                Float8Layout::RowMajor, weight_amax);
        auto dx = float8_mm(dy_n, w_n.t(), dy.scalar_type(), false, spec.emulate).view(x_sizes);  // [..., K]
        // dW = dyᵀ · x: both along M (the tokens, never split by TP), column-major.
        auto dy_m = same_dy_cast
                        ? dy_n
                        : cast_operand(dy, c.grad_output_for_grad_weight, 0, pow2,
                                       spec.tp.reduce_group(c.grad_output_for_grad_weight, {tokens, out}, tokens),
                                       Float8Layout::ColumnMajor);
        auto x_m = x_cast ? x_cast->for_grad_weight()  // [M, K]
                          : cast_operand(x.reshape({-1, K}), c.input_for_grad_weight, 0, pow2,
                                         spec.tp.reduce_group(c.input_for_grad_weight, {tokens, in}, tokens),
                                         Float8Layout::ColumnMajor);
        auto dw = float8_mm(dy_m.t(), x_m, dy.scalar_type(), false, spec.emulate);  // [N, K]
        return torch::autograd::variable_list{dx, dw.to(weight.scalar_type())};
      });
  return outputs[0];
}

/// FSDP's float8 all-gather of one converted weight (tensorwise): the shard cast with the scale
/// of the whole weight, then the gathered float8 weight handed to the layer.
class Float8WeightGather : public FsdpParamGather {
 public:
  explicit Float8WeightGather(ProcessGroupPtr tp_group) : tp_group_(std::move(tp_group)) {}
  at::ScalarType gather_dtype() const override { return at::kFloat8_e4m3fn; }
  ProcessGroupPtr statistic_group() const override { return tp_group_; }
  at::Tensor shard_statistic(const at::Tensor& shard) override {
    return precomputed_current(shard) ? at::Tensor() : shard_amax(shard);
  }
  at::Tensor pre_all_gather(const at::Tensor& shard, const at::Tensor& reduced_amax) override {
    at::NoGradGuard no_grad;
    at::Tensor data;
    std::tie(data, scale_, inverse_) = float8_cast(shard, reduced_amax.defined() ? reduced_amax : precomputed_,
                                                   at::kFloat8_e4m3fn, /*power_of_2=*/false);
    return data;
  }
  void post_all_gather(const at::Tensor& full) override { gathered_ = Float8Operand{full, scale_, inverse_}; }
  void post_reshard() override { gathered_.reset(); }

  /// The gathered weight [N, K] and its scale, while the unit is unsharded.
  const std::optional<Float8Operand>& gathered() const { return gathered_; }
  /// The whole weight's amax, precomputed for the shard as it is now (its version).
  void set_precomputed_amax(const at::Tensor& amax, const at::Tensor& shard) {
    precomputed_ = amax;
    precomputed_version_ = shard._version();
  }

 private:
  /// The precomputed amax belongs to the shard's current values (the optimizer's in-place update
  /// since then would have bumped the version: such an amax is stale and not used).
  bool precomputed_current(const at::Tensor& shard) const {
    return precomputed_.defined() && precomputed_version_ == shard._version();
  }

  ProcessGroupPtr tp_group_;
  at::Tensor precomputed_, scale_, inverse_;
  uint32_t precomputed_version_ = 0;
  std::optional<Float8Operand> gathered_;
};

}  // namespace detail

/// The hook convert_to_float8_training attaches to a linear layer: runs float8_linear instead of
/// the module's forward.
class Float8LinearHook : public ModuleHook, public FsdpGatherProvider {
 public:
  Float8LinearHook(torch::nn::Module& module, at::Tensor weight, at::Tensor bias, Float8Options options)
      : module_(&module), weight_(std::move(weight)), bias_(std::move(bias)), options_(std::move(options)) {
    spec_.casts = Float8Casts::of(options_.recipe());
    spec_.emulate = options_.emulate();
  }

  std::string name() const override { return "float8 linear (" + float8_recipe_name(options_.recipe()) + ")"; }
  HookKind kind() const override { return HookKind::Conversion; }

  std::shared_ptr<FsdpParamGather> fsdp_gather(const std::string& key) override {
    if (key != "weight" || !options_.enable_fsdp_float8_all_gather()) return nullptr;
    if (!gather_) gather_ = std::make_shared<detail::Float8WeightGather>(tensor_parallel().group);
    return gather_;
  }

  at::Tensor forward(torch::nn::Module& module, const TensorList& inputs, const ForwardFn& next) override {
    check_inputs(module, inputs);
    return run(module, inputs[0], nullptr);
  }

  /// Converted layers of the same recipe fuse (titan::call_fused): they read the same x.
  bool fuses_with(const ModuleHook& other) const override {
    const auto* o = dynamic_cast<const Float8LinearHook*>(&other);
    return o != nullptr && o->options_.recipe() == options_.recipe() && o->options_.emulate() == options_.emulate();
  }

  /// The converted layers `modules` on their shared input: x cast once (for every layer whose
  /// amax of x is reduced over the same group as the first's), each layer's own float8 weight and
  /// matmul, as when each is called alone (the same values).
  TensorList forward_fused(const std::vector<torch::nn::Module*>& modules, const TensorList& inputs) override {
    std::vector<std::shared_ptr<Float8LinearHook>> hooks;  // call_fused's fuses_with check: one on each module
    for (auto* module : modules) {
      auto hook = find_hook<Float8LinearHook>(*module);
      TORCH_INTERNAL_ASSERT(hook, "titan float8: forward_fused on a module without a float8 hook");
      hook->check_inputs(*module, inputs);
      hooks.push_back(std::move(hook));
    }
    const auto& x = inputs[0];
    bool requires_grad = x.requires_grad();
    for (const auto& hook : hooks) requires_grad = requires_grad || hook->weight_.requires_grad();
    const auto& spec = hooks.front()->spec_;  // the same recipe in all (fuses_with)
    auto shared = detail::cast_input(x, spec, detail::keeps_input_cast(spec, requires_grad));
    const auto group = detail::input_group(spec);
    TensorList outputs;
    for (size_t i = 0; i < modules.size(); ++i) {
      const bool same_group = detail::input_group(hooks[i]->spec_) == group;
      outputs.push_back(hooks[i]->run(*modules[i], x, same_group ? shared : nullptr));
    }
    shared->end_forward();
    return outputs;
  }

  /// Every converted layer of `root` has run in float8: a layer that never did (it, or the root,
  /// called as ->forward(...), which skips the hook) would train in high precision unnoticed.
  void verify_model(const torch::nn::Module& root) const override {
    std::string idle;
    int count = 0, converted = 0;
    detail::visit_modules(root, "", [&](const std::string& path, const torch::nn::Module& module) {
      auto hook = find_hook<Float8LinearHook>(module);
      if (!hook) return;
      ++converted;
      if (!hook->ran_ && count++ < 3) idle += (idle.empty() ? "'" : ", '") + (path.empty() ? "<root>" : path) + "'";
    });
    TORCH_CHECK(count == 0, "titan float8: ", count, " of the ", converted, " linear layers of '", root.name(),
                "' converted to float8 never ran in float8 (", idle, count > 3 ? ", ..." : "", "): a converted layer ",
                "runs in float8 only when it is called through titan::call, and so is every module above it that ",
                "has hooks (a root called as model->forward(...) skips its own); call them as titan::call(module, ...)");
  }

  const Float8Options& options() const { return options_; }

 private:
  /// Checks the layer's input and learns, on the first call, its tensor-parallel split.
  void check_inputs(torch::nn::Module& module, const TensorList& inputs) {
    TORCH_CHECK(inputs.size() == 1, "titan float8: linear layer '", module.name(), "' was called with ",
                inputs.size(), " tensors; a converted layer takes one input x [..., in_features]");
    const auto& x = inputs[0];
    TORCH_CHECK(x.size(-1) == weight_.size(1), "titan float8: linear layer '", module.name(), "' got an input of ",
                x.sizes(), " but its weight is ", weight_.sizes(), " (expected the last dimension ", weight_.size(1), ")");
    TORCH_CHECK(x.is_floating_point() && !c10::isFloat8Type(x.scalar_type()), "titan float8: linear layer '",
                module.name(), "' got a ", x.scalar_type(), " input; expected float32, bfloat16 or float16");
    if (!tp_known_) {
      spec_.tp = tensor_parallel();
      tp_known_ = true;
      spec_.emulate = options_.emulate() || (x.device().is_cpu() && options_.recipe() != Float8Recipe::Tensorwise);
    }
    if (!spec_.emulate && x.device().is_cuda()) {
      const int64_t k = x.size(-1), n = weight_.size(0);
      TORCH_CHECK(k % 16 == 0 && n % 16 == 0, "titan float8: linear layer '", module.name(), "' multiplies [..., ", k,
                  "] by [", n, ", ", k, "] (local shapes); CUDA's _scaled_mm needs both dimensions divisible by 16: ",
                  "leave the layer in high precision (Float8Options::filter_fqns) or change the tensor-parallel degree");
    }
  }

  /// The layer's output for x (checked), from `x_cast` when given.
  at::Tensor run(torch::nn::Module& module, const at::Tensor& x, std::shared_ptr<detail::Float8Input> x_cast) {
    std::optional<detail::Float8Operand> gathered;
    if (gather_) {
      gathered = gather_->gathered();
      TORCH_CHECK(gathered, "titan float8: linear layer '", module.name(), "' gathers its weight in float8 under ",
                  "fully_shard, but no float8 weight is gathered: call the layer's fully_shard unit through titan::call");
    }
    auto y = detail::float8_linear(x, std::move(x_cast), weight_, gathered, spec_);
    ran_ = true;
    return bias_.defined() ? y + bias_.to(y.scalar_type()) : y;
  }

  /// The weight's tensor-parallel split, from the layouts of the TP hooks on the module.
  detail::Float8TensorParallel tensor_parallel() const {
    detail::Float8TensorParallel tp;
    for (const auto& hook : hooks_of(*module_)) {
      auto* provider = dynamic_cast<ParameterLayoutProvider*>(hook.get());
      if (!provider || hook->kind() != HookKind::TensorParallel) continue;
      auto layout = provider->layout_of("weight");
      if (!layout || layout->levels.empty()) continue;
      const auto& level = layout->levels.front();
      tp.group = level.group;
      tp.split = level.dim == 0 ? detail::Float8TensorParallel::Split::OutFeatures
                                : detail::Float8TensorParallel::Split::InFeatures;
    }
    return tp;
  }

  torch::nn::Module* module_;  ///< the module this hook is attached to (owns the hook)
  at::Tensor weight_, bias_;   ///< the module's parameters (handles to the members' tensors)
  Float8Options options_;
  detail::Float8LinearSpec spec_;
  bool tp_known_ = false;
  bool ran_ = false;  ///< forward ran at least once (verify_model)
  std::shared_ptr<detail::Float8WeightGather> gather_;
};

/// Converts the linear layers of `root` (a module, ModuleHolder, shared_ptr or pointer) to float8
/// training: every module Float8Options::is_linear accepts, whose name contains none of
/// filter_fqns and whose weight's dimensions are both divisible by 16 (torchtitan's rule), gets a
/// Float8LinearHook. Apply it before tensor parallelism, activation checkpointing and fully_shard
/// (the float8 hook must be innermost); the layers must be called through titan::call. Returns the
/// names of the converted layers; converting none is an error (it names the layers skipped for
/// their dimensions), skipping some a warning.
template <typename M>
std::vector<std::string> convert_to_float8_training(M&& root_like, const Float8Options& options = {}) {
  torch::nn::Module& root = detail::module_ref(root_like);
  TORCH_CHECK(!options.enable_fsdp_float8_all_gather() || options.recipe() == Float8Recipe::Tensorwise,
              "titan::convert_to_float8_training: enable_fsdp_float8_all_gather needs the tensorwise recipe (one ",
              "scale per weight), but the recipe is ", float8_recipe_name(options.recipe()));
  detail::check_hook_order(root, HookKind::Conversion, "titan::convert_to_float8_training");
  std::vector<std::pair<std::string, torch::nn::Module*>> chosen;
  std::vector<std::string> not_multiples;  // linear layers left in high precision: a dimension not a multiple of 16
  detail::visit_modules(root, "", [&](const std::string& path, torch::nn::Module& module) {
    if (!options.is_linear()(module)) return;
    for (const auto& skip : options.filter_fqns())
      if (!skip.empty() && path.find(skip) != std::string::npos) return;
    const auto params = module.named_parameters(/*recurse=*/false);
    const auto* weight = params.find("weight");
    TORCH_CHECK(weight && weight->dim() == 2, "titan::convert_to_float8_training: linear layer '", path,
                "' has no 2-D parameter 'weight' [out_features, in_features]; Float8Options::is_linear should only ",
                "accept modules computing y = x weightᵀ (+ bias)");
    if (weight->size(0) % 16 != 0 || weight->size(1) % 16 != 0) {
      not_multiples.push_back(c10::str("'", path, "' ", weight->sizes()));
      return;
    }
    TORCH_CHECK(hooks_of(module).empty(), "titan::convert_to_float8_training: linear layer '", path,
                "' already has hooks (", hooks_of(module).back()->name(), "); convert to float8 before ",
                "parallelize_module, activation checkpointing and fully_shard");
    chosen.emplace_back(path, &module);
  });
  const std::string skipped =
      not_multiples.empty() ? std::string()
                            : c10::str(not_multiples.size(), " linear layer(s) have a weight dimension that is not a multiple ",
                                       "of 16, which float8 matmuls need (", not_multiples.front(),
                                       not_multiples.size() > 1 ? ", ..." : "", ")");
  TORCH_CHECK(!chosen.empty(), "titan::convert_to_float8_training: no linear layer to convert, so the model would ",
              "train in high precision only: ",
              skipped.empty() ? "Float8Options::is_linear accepts none outside filter_fqns" : skipped,
              skipped.empty() ? "" : "; make the model's widths multiples of 16, or leave float8 off");
  if (!skipped.empty()) TORCH_WARN("titan::convert_to_float8_training: ", skipped, " and stay in high precision");
  std::vector<std::string> converted;
  for (auto& [path, module] : chosen) {
    const auto params = module->named_parameters(/*recurse=*/false);
    const auto* bias = params.find("bias");
    attach_hook(*module, std::make_shared<Float8LinearHook>(*module, params["weight"], bias ? *bias : at::Tensor(), options));
    converted.push_back(path);
  }
  return converted;
}

/// Precomputes, for every float8-gathered weight under `model` (a module, ModuleHolder, shared_ptr
/// or pointer), the scale of its next all-gather from the global amax: one all-reduce for the
/// whole model instead of one per unit (torchao's precompute_float8_dynamic_scale_for_fsdp). Call
/// it after optimizer.step(); a scale whose shard has changed since is not used (the unit then
/// reduces the amaxes itself), so forgetting a call costs time, never correctness.
template <typename M>
void precompute_float8_dynamic_scale_for_fsdp(const M& model) {
  struct Entry {
    std::shared_ptr<detail::Float8WeightGather> gather;
    at::Tensor shard;
    ProcessGroupPtr shard_group, tp_group;
  };
  std::vector<Entry> entries;
  for (const auto& unit : detail::hooks_in_subtree<FsdpHook>(detail::module_ref(model)))
    for (const auto& p : unit->params())
      if (auto gather = std::dynamic_pointer_cast<detail::Float8WeightGather>(p.custom_gather))
        entries.push_back({gather, p.sharded, unit->shard_group(), gather->statistic_group()});
  if (entries.empty()) return;
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> amaxes;
  for (const auto& e : entries)
    amaxes.push_back(detail::shard_amax(e.shard).reshape({1}));
  auto amax = at::cat(amaxes);  // [weights]
  std::vector<ProcessGroupPtr> shard_groups, tp_groups;  // one all-reduce per distinct group
  for (const auto& e : entries) {
    shard_groups.push_back(e.shard_group);
    tp_groups.push_back(e.tp_group);
  }
  detail::max_over_groups(amax, shard_groups);
  detail::max_over_groups(amax, tp_groups);
  for (size_t i = 0; i < entries.size(); ++i)  // each gather casts with its weight's amax (titan::float8_cast)
    entries[i].gather->set_precomputed_amax(amax[static_cast<int64_t>(i)], entries[i].shard);
}

}  // namespace titan
