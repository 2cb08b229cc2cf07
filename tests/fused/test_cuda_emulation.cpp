// titan's CUDA kernels (include/titan/fused/cuda/*.cuh) run on the CPU under cuda_emulator.hpp,
// in CI, where there is no GPU. Each kernel is checked against its operator's ATen implementation
// (as close to the fp64 result as the ATen result is, up to one rounding of the dtype), at shapes
// that take every path of its launch: 16-byte packs and one element at a time (inputs one element
// past a 16-byte boundary), several grid-stride rounds, rows longer than a block and shorter than
// a warp, q, k, gate and up read in place as column slices of a fused projection, several row
// chunks of add_rms_norm's weight gradient, the 64-bit index path, NaN and -inf logits; in fp32,
// fp16 and bf16. Each gives the same bits whatever order the emulator runs threads and blocks in
// (a race would not); the emulator fails a misaligned pack access, and this suite's build has
// AddressSanitizer, which stops at a kernel's read or write past a tensor. The emulator's own
// checks (a race, a barrier not every thread reaches, a device-side assert) are shown to fail
// where they should. titan::adamw_copy_'s kernel is ATen's multi-tensor launcher (device code the
// host compiler cannot build) running titan's functor: here a launcher of this suite's runs the
// functor, so its arithmetic is checked, ATen's launcher only by the GPU kit.
#include "cuda_emulator.hpp"  // before the kernels: they compile against it

#include <titan/fused/cuda/adamw_functor.cuh>
#include <titan/fused/cuda/add_rms_norm.cuh>
#include <titan/fused/cuda/cross_entropy.cuh>
#include <titan/fused/cuda/float8_cast.cuh>
#include <titan/fused/cuda/moe_combine.cuh>
#include <titan/fused/cuda/rope.cuh>
#include <titan/fused/cuda/swiglu.cuh>

#include "kernel_checks.hpp"

#include <titan/fused/adamw.hpp>

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

using titan_emulation::Order;
using titan_test::as_close_as;
using Tensors = std::vector<at::Tensor>;

/// A case of a kernel test: the dtype, and whether the inputs start one element past a 16-byte
/// boundary (which takes the kernels' one-element-at-a-time path instead of 16-byte packs; in one
/// dtype: the path does not depend on it).
struct Case {
  at::ScalarType dtype;
  bool shifted;
};
constexpr Case kCases[] = {{at::kFloat, false}, {at::kHalf, false}, {at::kBFloat16, false}, {at::kBFloat16, true}};

/// `t` itself, or when `shifted` a copy that starts one element past a 16-byte boundary.
at::Tensor place(const at::Tensor& t, bool shifted) { return shifted && t.defined() ? titan_test::shifted(t) : t; }

/// Samples of `shape` from a normal distribution times `scale`, drawn in fp64 and rounded to `dtype`.
at::Tensor sample(at::IntArrayRef shape, at::ScalarType dtype, double scale = 1.0) {
  return (at::randn(shape, at::kDouble) * scale).to(dtype);
}

/// The tensors `run` returns with the emulator's threads and blocks in ascending order; for fp32
/// (a race does not depend on the dtype, and each order costs a run) checked to be the same bits
/// in descending and in a shuffled order.
template <typename Run>
Tensors in_every_order(at::ScalarType dtype, const Run& run) {
  titan_emulation::set_order(Order::ascending);
  const Tensors first = run();
  if (dtype != at::kFloat) return first;
  for (const Order order : {Order::descending, Order::shuffled}) {
    titan_emulation::set_order(order, /*seed=*/7);
    const Tensors other = run();
    CAPTURE(static_cast<int>(order));
    REQUIRE(other.size() == first.size());
    for (size_t i = 0; i < first.size(); ++i) {
      CAPTURE(i);
      CHECK(at::equal(other[i], first[i]));
    }
  }
  titan_emulation::set_order(Order::ascending);
  return first;
}

/// Whether `elements` take more than one grid-stride round of the element-wise kernels (on the
/// emulated GPU) even in 16-byte packs of 8 bf16 elements, the fewest packs a launch makes.
bool several_rounds_in_packs(int64_t elements) {
  const int64_t packs = elements / 8;
  return packs > int64_t{titan::cuda::detail::grid_stride_blocks(packs)} * titan::cuda::detail::kElementwiseThreads;
}

/// Checks each kernel result against the ATen implementation's `want` and the fp64 `exact`, in `dtype`.
void check_close(const Tensors& got, const Tensors& want, const Tensors& exact, at::ScalarType dtype) {
  REQUIRE(got.size() == want.size());
  REQUIRE(got.size() == exact.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    REQUIRE(got[i].sizes() == want[i].sizes());
    CHECK((got[i].scalar_type() == want[i].scalar_type()));
    CHECK(as_close_as(got[i], want[i], exact[i], dtype));
  }
}

}  // namespace

TEST_CASE("emulated CUDA: add_rms_norm's kernels match the ATen implementation, forward and backward") {
  constexpr double kEps = 1e-5;
  // [rows, dim]: rows of more packs than a block's 512 threads, enough rows for two row chunks of
  // the weight gradient (the emulated GPU has 2 multiprocessors) with a partial column tile, and
  // rows shorter than a warp.
  for (const auto& shape : {std::pair<int64_t, int64_t>{3, 4400}, {128, 40}, {2, 5}})
    for (const Case c : kCases)
      for (const bool residual : {false, true}) {
        const int64_t rows = shape.first, dim = shape.second;
        const auto dtype = c.dtype;
        CAPTURE(rows);
        CAPTURE(dim);
        CAPTURE(dtype);
        CAPTURE(c.shifted);
        CAPTURE(residual);
        at::manual_seed(1);
        const auto x = place(sample({rows, dim}, dtype, 3), c.shifted);                  // [R, D]
        const auto delta = place(sample({rows, dim}, dtype), c.shifted);                 // [R, D]
        const auto weight = place(sample({dim}, dtype), c.shifted);                      // [D]
        const auto grad_normed = place(sample({rows, dim}, dtype), c.shifted);           // [R, D]
        const auto grad_sum = place(residual ? sample({rows, dim}, dtype) : at::Tensor(), c.shifted);  // [R, D]
        const auto got = in_every_order(dtype, [&] {
          auto [sum, normed, rstd] = titan::cuda::add_rms_norm_forward(x, delta, weight, kEps);
          auto [d_input, d_weight] = titan::cuda::add_rms_norm_backward(grad_sum, grad_normed, sum, weight, rstd, kEps);
          return Tensors{sum, normed, rstd, d_input, d_weight};
        });
        const auto [sum, normed, rstd] = titan::detail::add_rms_norm_forward_aten(x, delta, weight, kEps);
        CHECK(at::equal(got[0], sum));  // x + delta in fp32, rounded once: as at::add
        const auto [d_input, d_weight] =
            titan::detail::add_rms_norm_backward_aten(grad_sum, grad_normed, sum, weight, rstd, kEps);
        // The exact values from the rounded sum, as both compute them.
        const auto s = sum.to(at::kDouble), w = weight.to(at::kDouble);
        const auto [unused, normed_exact, rstd_exact] =
            titan::detail::add_rms_norm_forward_aten(s, at::zeros_like(s), w, kEps);
        const auto [d_input_exact, d_weight_exact] = titan::detail::add_rms_norm_backward_aten(
            residual ? grad_sum.to(at::kDouble) : at::Tensor(), grad_normed.to(at::kDouble), s, w, rstd_exact, kEps);
        check_close({got[1], got[3], got[4]}, {normed, d_input, d_weight},
                    {normed_exact, d_input_exact, d_weight_exact}, dtype);
        CHECK(as_close_as(got[2], rstd, rstd_exact, at::kFloat));
      }
}

TEST_CASE("emulated CUDA: the cross entropy kernel matches the ATen implementation; the rescaling too") {
  constexpr int64_t kIgnore = -100;
  // [rows, vocab]: a vocabulary narrower than a warp, one longer than the block's 512 threads whose
  // rows start at alternating offsets from a 16-byte boundary (bf16) and whose gradient takes the
  // rescaling several grid-stride rounds, and one of whole packs.
  CHECK(several_rounds_in_packs(24 * 1500));
  for (const auto& shape : {std::pair<int64_t, int64_t>{5, 7}, {24, 1500}, {3, 1504}})
    for (const Case c : kCases) {
      const int64_t rows = shape.first, vocab = shape.second;
      const auto dtype = c.dtype;
      CAPTURE(rows);
      CAPTURE(vocab);
      CAPTURE(dtype);
      CAPTURE(c.shifted);
      at::manual_seed(2);
      const auto logits = place(sample({rows, vocab}, dtype, 4), c.shifted);  // [N, V]
      auto targets = at::randint(vocab, {rows}, at::kLong);                   // [N]
      targets.index_put_({at::arange(0, rows, 3)}, kIgnore);                  // rows 0, 3, ... ignored
      const double scale = 1.0 / static_cast<double>(targets.ne(kIgnore).sum().item<int64_t>());
      const auto got = in_every_order(dtype, [&] {
        auto [loss, grad] = titan::cuda::cross_entropy_loss_and_grad(logits, targets, kIgnore, 0, true, scale);
        return Tensors{loss, grad};
      });
      const auto [loss, grad] =
          titan::detail::cross_entropy_loss_and_grad_aten(logits, targets, kIgnore, rows * vocab, true, scale);
      const auto [loss_exact, grad_exact] = titan::detail::cross_entropy_loss_and_grad_aten(
          logits.to(at::kDouble), targets, kIgnore, rows * vocab, true, scale);
      check_close(got, {loss, grad}, {loss_exact, grad_exact}, dtype);
      CHECK(at::equal(got[1].index({at::arange(0, rows, 3)}), at::zeros({(rows + 2) / 3, vocab}, logits.options())));

      // The loss alone: the same bits, and no gradient.
      const auto [loss_only, no_grad] =
          titan::cuda::cross_entropy_loss_and_grad(logits, targets, kIgnore, 0, false, 1.0);
      CHECK(at::equal(loss_only, got[0]));
      CHECK(no_grad.numel() == 0);

      // The backward's rescaling: nothing at a factor of 1, else the gradient times the factor.
      const auto rescaled = [&](double grad_output) {
        return in_every_order(dtype, [&] {
          auto g = place(got[1].clone(), c.shifted);
          titan::cuda::cross_entropy_rescale_grad_(g, at::full({}, grad_output, at::kFloat), scale);
          return Tensors{g};
        })[0];
      };
      CHECK(at::equal(rescaled(static_cast<float>(scale)), got[1]));
      auto want = got[1].clone();
      titan::detail::cross_entropy_rescale_grad_aten(want, at::full({}, 0.3, at::kFloat), scale);
      CHECK(at::equal(rescaled(0.3), want));
    }
}

TEST_CASE("emulated CUDA: a row of NaN or -inf logits: a NaN loss, or the other logits' softmax") {
  for (const Case c : kCases) {
    const auto dtype = c.dtype;
    CAPTURE(dtype);
    CAPTURE(c.shifted);
    auto values = sample({3, 64}, dtype);
    values[0][17] = NAN;                          // row 0: one NaN among finite logits
    values[1].narrow(0, 8, 8).fill_(NAN);         // row 1: a whole pack of NaN
    values[2].narrow(0, 0, 32).fill_(-INFINITY);  // row 2: packs of -inf, then finite logits
    const auto logits = place(values, c.shifted);             // [3, 64]
    const auto targets = at::tensor({1, 2, 40}, at::kLong);   // [3]
    const auto row = [&](int64_t r) {                         // row r's loss and gradient
      return titan::cuda::cross_entropy_loss_and_grad(logits.narrow(0, r, 1), targets.narrow(0, r, 1), -100, 0,
                                                      true, 1.0);
    };
    CHECK(std::isnan(std::get<0>(row(0)).item<float>()));
    CHECK(std::isnan(std::get<0>(row(1)).item<float>()));
    const auto [loss_2, grad_2] = row(2);
    const auto [want_2, want_grad_2] = titan::detail::cross_entropy_loss_and_grad_aten(
        logits.narrow(0, 2, 1).to(at::kDouble), targets.narrow(0, 2, 1), -100, 64, true, 1.0);
    CHECK(std::abs(loss_2.item<double>() - want_2.item<double>()) <= 1e-5 * std::abs(want_2.item<double>()));
    CHECK(at::equal(grad_2.narrow(1, 0, 32), at::zeros({1, 32}, grad_2.options())));
  }
}

TEST_CASE("emulated CUDA: an out-of-range target is a device-side assert naming the block and thread") {
  const auto logits = at::randn({4, 40});
  const auto targets = at::tensor({1, 2, 40, 3}, at::kLong);  // row 2 out of range
  try {
    titan::cuda::cross_entropy_loss_and_grad(logits, targets, -100, 0, true, 1.0);
    FAIL("expected a device-side assert");
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    CHECK(message.find("device-side assert `!kept || (target >= 0 && target < vocab)` failed") != std::string::npos);
    CHECK(message.find("in block (2, 0, 0), thread (0, 0, 0)") != std::string::npos);
  }
}

TEST_CASE("emulated CUDA: the RoPE kernel matches the ATen implementation on q and k, in place in a fused projection") {
  // [B, S, Hq, Hk, D]: 21,120 pairs (several grid-stride rounds, in packs too), and one pair per head.
  CHECK(several_rounds_in_packs(2 * 33 * (8 + 2) * 64));
  for (const auto& shape : {std::array<int64_t, 5>{2, 33, 8, 2, 64}, {1, 3, 1, 1, 2}})
    for (const Case c : kCases)
      for (const bool fused : {false, true})
        for (const bool native_tables : {false, true}) {
          const int64_t B = shape[0], S = shape[1], Hq = shape[2], Hk = shape[3], D = shape[4];
          const auto dtype = c.dtype;
          CAPTURE(D);
          CAPTURE(dtype);
          CAPTURE(c.shifted);
          CAPTURE(fused);
          CAPTURE(native_tables);
          at::manual_seed(3);
          // q [B, S, Hq, D] and k [B, S, Hk, D], and where shifted, the same values one element off.
          at::Tensor q, k;  // [B, S, Hq, D], [B, S, Hk, D]
          if (fused) {      // column slices of one [B, S, (Hq + 2 Hk) D] projection
            const auto qkv = place(sample({B, S, (Hq + 2 * Hk) * D}, dtype), c.shifted);
            q = qkv.narrow(-1, 0, Hq * D).unflatten(-1, {Hq, D});
            k = qkv.narrow(-1, Hq * D, Hk * D).unflatten(-1, {Hk, D});
          } else {
            q = place(sample({B, S, Hq, D}, dtype), c.shifted);
            k = place(sample({B, S, Hk, D}, dtype), c.shifted);
          }
          const auto angles = at::arange(S, at::kDouble).unsqueeze(1) * at::rand({D / 2}, at::kDouble);  // [S, D/2]
          const auto table = native_tables ? dtype : at::kFloat;
          const auto cos = angles.cos().to(table), sin = angles.sin().to(table);  // [S, D/2]
          const auto grad_q = place(sample({B, S, Hq, D}, dtype), c.shifted);
          const auto grad_k = place(sample({B, S, Hk, D}, dtype), c.shifted);
          const auto run = [&](const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& dq_in,
                               const at::Tensor& dk_in) {
            auto [q_out, k_out] = titan::cuda::rope_forward(q_in, k_in, cos, sin);
            auto [dq, dk] = titan::cuda::rope_backward(dq_in, dk_in, cos, sin);
            return Tensors{q_out, k_out, dq, dk};
          };
          const auto got = in_every_order(dtype, [&] { return run(q, k, grad_q, grad_k); });
          if (c.shifted) {  // one pair at a time: the same bits as the packs
            const auto aligned = [](const at::Tensor& t) { return t.clone(at::MemoryFormat::Contiguous); };
            const auto packed = run(aligned(q), aligned(k), aligned(grad_q), aligned(grad_k));
            for (size_t i = 0; i < got.size(); ++i) CHECK(at::equal(got[i], packed[i]));
          }
          const auto [q_out, k_out] = titan::detail::rope_forward_aten(q, k, cos, sin);
          const auto [dq, dk] = titan::detail::rope_backward_aten(grad_q, grad_k, cos, sin);
          const auto cd = cos.to(at::kDouble), sd = sin.to(at::kDouble);
          const auto [q_exact, k_exact] =
              titan::detail::rope_forward_aten(q.to(at::kDouble), k.to(at::kDouble), cd, sd);
          const auto [dq_exact, dk_exact] =
              titan::detail::rope_backward_aten(grad_q.to(at::kDouble), grad_k.to(at::kDouble), cd, sd);
          check_close(got, {q_out, k_out, dq, dk}, {q_exact, k_exact, dq_exact, dk_exact}, dtype);
        }
}

TEST_CASE("emulated CUDA: the SwiGLU kernels match the ATen implementation, in place in a fused projection") {
  for (const Case c : kCases)
    for (const bool fused : {false, true}) {
      const auto dtype = c.dtype;
      CAPTURE(dtype);
      CAPTURE(c.shifted);
      CAPTURE(fused);
      at::manual_seed(4);
      constexpr int64_t rows = 4 * 33, cols = 256;  // 33,792 elements: two grid-stride rounds in packs
      at::Tensor gate, up;                          // [4, 33, cols] each
      if (fused) {                                  // column slices of one [4, 33, 2 cols] projection
        const auto h = place(sample({4, 33, 2 * cols}, dtype, 3), c.shifted);
        gate = h.narrow(-1, 0, cols);
        up = h.narrow(-1, cols, cols);
      } else {
        gate = place(sample({4, 33, cols}, dtype, 3), c.shifted);
        up = place(sample({4, 33, cols}, dtype, 3), c.shifted);
      }
      const auto grad = place(sample({4, 33, cols}, dtype), c.shifted);
      const auto run = [&](const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& grad_in) {
        auto out = titan::cuda::swiglu_forward(gate_in, up_in);
        auto [d_gate, d_up] = titan::cuda::swiglu_backward(grad_in, gate_in, up_in);
        return Tensors{out, d_gate, d_up};
      };
      const auto got = in_every_order(dtype, [&] { return run(gate, up, grad); });
      if (c.shifted) {  // one element at a time: the same bits as the packs
        const auto aligned = [](const at::Tensor& t) { return t.clone(at::MemoryFormat::Contiguous); };
        const auto packed = run(aligned(gate), aligned(up), aligned(grad));
        for (size_t i = 0; i < got.size(); ++i) CHECK(at::equal(got[i], packed[i]));
      }
      const auto out = titan::detail::swiglu_forward_aten(gate, up);
      const auto [d_gate, d_up] = titan::detail::swiglu_backward_aten(grad, gate, up);
      const auto g = gate.to(at::kDouble), u = up.to(at::kDouble);
      const auto out_exact = titan::detail::swiglu_forward_aten(g, u);
      const auto [d_gate_exact, d_up_exact] = titan::detail::swiglu_backward_aten(grad.to(at::kDouble), g, u);
      check_close(got, {out, d_gate, d_up}, {out_exact, d_gate_exact, d_up_exact}, dtype);
      CHECK(several_rounds_in_packs(rows * cols));
    }
  // 0-dim gate and up: one element.
  const auto gate = at::scalar_tensor(1.5), up = at::scalar_tensor(-2.0), grad = at::scalar_tensor(0.5);
  const auto out = titan::cuda::swiglu_forward(gate, up);
  CHECK(out.dim() == 0);
  CHECK(as_close_as(out, titan::detail::swiglu_forward_aten(gate, up),
                    titan::detail::swiglu_forward_aten(gate.to(at::kDouble), up.to(at::kDouble)), at::kFloat));
  const auto [d_gate, d_up] = titan::cuda::swiglu_backward(grad, gate, up);
  const auto [d_gate_want, d_up_want] = titan::detail::swiglu_backward_aten(grad, gate, up);
  const auto [d_gate_exact, d_up_exact] =
      titan::detail::swiglu_backward_aten(grad.to(at::kDouble), gate.to(at::kDouble), up.to(at::kDouble));
  check_close({d_gate, d_up}, {d_gate_want, d_up_want}, {d_gate_exact, d_up_exact}, at::kFloat);
}

TEST_CASE("emulated CUDA: the float8 cast kernel gives the bits of the scalar computation, in any dense layout") {
  // [132, 256]: 33,792 elements, two grid-stride rounds in packs; hp contiguous or a weight's
  // transpose; one amax, one per row (row 2 with a NaN), one per column; amax in hp's dtype or fp32.
  constexpr int64_t rows = 132, cols = 256;
  for (const Case c : kCases)
    for (const auto dtype : {at::kFloat8_e4m3fn, at::kFloat8_e5m2})
      for (const bool power_of_2 : {false, true})
        for (const bool transposed : {false, true})
          for (const std::optional<int64_t> dim : {std::optional<int64_t>(), std::optional<int64_t>(1),
                                                   std::optional<int64_t>(0)})
            for (const bool fp32_amax : {false, true}) {
              if (transposed && c.shifted) continue;  // a shifted copy is contiguous
              CAPTURE(c.dtype);
              CAPTURE(c.shifted);
              CAPTURE(dtype);
              CAPTURE(power_of_2);
              CAPTURE(transposed);
              CAPTURE(dim.value_or(-1));
              CAPTURE(fp32_amax);
              at::manual_seed(8);
              auto values = transposed ? sample({cols, rows}, at::kDouble, 3).t()  // [rows, cols] each
                                       : sample({rows, cols}, at::kDouble, 3);
              values.select(0, 1).zero_();
              if (dim == 1) values.index_put_({2, 3}, std::nan(""));  // only row 2's amax (and scale) is NaN
              const auto hp = place(values.to(c.dtype), c.shifted);  // [rows, cols]
              auto amax = titan_test::float8_amax(hp, dim, /*shrink=*/1.5);
              if (fp32_amax) amax = amax.to(at::kFloat);
              const auto got = in_every_order(c.dtype, [&] {  // scale_out written once per entry: no race
                auto [data, scale, inverse] = titan::cuda::float8_cast(hp, amax, dtype, power_of_2);
                CHECK(data.strides() == hp.strides());
                using titan_test::bits_of;  // bits: NaN compares
                return Tensors{bits_of(data), bits_of(scale), bits_of(inverse)};
              });
              const auto [data_want, scale_want, inverse_want] =
                  titan_test::float8_cast_reference(hp, amax, dtype, power_of_2);
              CHECK(at::equal(got[0], titan_test::bits_of(data_want)));
              CHECK(at::equal(got[1], titan_test::bits_of(scale_want)));
              CHECK(at::equal(got[2], titan_test::bits_of(inverse_want)));
              CHECK(several_rounds_in_packs(rows * cols));
            }
}

TEST_CASE("emulated CUDA: the float8 transposing cast writes the cast's bits in each layout asked for") {
  // Tiles of 64 x 64: [264, 200], 5 x 4 tiles, partial at the bottom and the right, two grid-stride
  // rounds of the emulated GPU's 16 blocks, read in 16-byte packs (rows and columns multiples of 8)
  // unless the input starts one element past a 16-byte boundary or is a column slice; [70, 45]
  // element by element. hp contiguous, a weight's transpose (read as its transpose's rows) or a
  // column slice (rows with gaps); one amax, one per row (row 2 with a NaN), one per column;
  // row-major from a transpose, column-major from rows, and both (the tiled kernel), or the one
  // layout hp has (the element-wise kernel).
  CHECK(5 * 4 > titan::cuda::detail::multiprocessors() * 8);
  enum class Hp { Rows, Transposed, ColumnSlice };
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{264, 200}, {70, 45}})
    for (const Case c : kCases)
      for (const auto& [dtype, power_of_2] : {std::pair{at::kFloat8_e4m3fn, false}, std::pair{at::kFloat8_e5m2, true}})
        for (const Hp layout : {Hp::Rows, Hp::Transposed, Hp::ColumnSlice})
          for (const std::optional<int64_t> dim : {std::optional<int64_t>(), std::optional<int64_t>(1),
                                                   std::optional<int64_t>(0)})
            for (const auto& [row_major, column_major] : {std::pair{true, false}, {false, true}, {true, true}}) {
              if (layout != Hp::Rows && c.shifted) continue;  // a shifted copy is contiguous
              CAPTURE(rows);
              CAPTURE(c.dtype);
              CAPTURE(c.shifted);
              CAPTURE(dtype);
              CAPTURE(static_cast<int>(layout));
              CAPTURE(dim.value_or(-1));
              CAPTURE(row_major);
              CAPTURE(column_major);
              at::manual_seed(9);
              auto values = layout == Hp::Transposed    ? sample({cols, rows}, at::kDouble, 3).t()
                            : layout == Hp::ColumnSlice ? sample({rows, cols + 6}, at::kDouble, 3).narrow(1, 0, cols)
                                                        : sample({rows, cols}, at::kDouble, 3);  // [rows, cols]
              values.select(0, 1).zero_();
              if (dim == 1) values.index_put_({2, 3}, std::nan(""));  // only row 2's amax (and scale) is NaN
              auto hp = layout == Hp::ColumnSlice
                            ? at::empty({rows, cols + 6}, c.dtype).narrow(1, 0, cols).copy_(values)  // rows with gaps
                            : place(values.to(c.dtype), c.shifted);
              auto amax = titan_test::float8_amax(hp, dim, /*shrink=*/1.5);
              if (c.shifted) amax = amax.to(at::kFloat);
              const auto got = in_every_order(c.dtype, [&] {  // scale_out written once per entry: no race
                auto [data_rows, data_columns, scale, inverse] =
                    titan::cuda::float8_cast_transpose(hp, amax, dtype, power_of_2, row_major, column_major);
                CHECK(data_rows.defined() == row_major);
                CHECK(data_columns.defined() == column_major);
                if (row_major) CHECK(data_rows.is_contiguous());
                if (column_major) CHECK(data_columns.t().is_contiguous());
                using titan_test::bits_of;  // bits: NaN compares
                const auto none = at::empty({0}, at::kByte);
                return Tensors{row_major ? bits_of(data_rows) : none,
                               column_major ? bits_of(data_columns) : none, bits_of(scale),
                               bits_of(inverse)};
              });
              const auto [data_want, scale_want, inverse_want] =
                  titan_test::float8_cast_reference(hp, amax, dtype, power_of_2);
              const auto want = titan_test::bits_of(data_want);
              if (row_major) CHECK(at::equal(got[0], want));
              if (column_major) CHECK(at::equal(got[1], want));
              CHECK(at::equal(got[2], titan_test::bits_of(scale_want)));
              CHECK(at::equal(got[3], titan_test::bits_of(inverse_want)));
            }
}

TEST_CASE("emulated CUDA: the MoE combine kernels match the ATen implementation, with dropped slots") {
  // [tokens, k, dim]: rows of more packs than a block's 512 threads, many tokens of whole packs,
  // rows shorter than a warp; every slot kept, or every third one and all of token 0's dropped.
  for (const auto& shape : {std::array<int64_t, 3>{5, 3, 4400}, {48, 8, 40}, {6, 2, 5}})
    for (const Case c : kCases)
      for (const auto weight_dtype :  // none, fp32, the rows' dtype
           {std::optional<at::ScalarType>(), std::optional(at::kFloat), std::optional(c.dtype)})
        for (const bool dropped : {false, true}) {
          const int64_t tokens = shape[0], k = shape[1], dim = shape[2];
          const auto dtype = c.dtype;
          CAPTURE(dim);
          CAPTURE(dtype);
          CAPTURE(c.shifted);
          CAPTURE(weight_dtype.value_or(at::kLong));
          CAPTURE(dropped);
          at::manual_seed(6);
          auto slot = at::randperm(tokens * k, at::kLong);  // [N]: the dispatch's slots t·k + j, by expert
          if (dropped) slot = slot.index({(at::arange(tokens * k) % 3 != 1) & (slot.div(k, "floor") != 0)});
          const int64_t n = slot.size(0);
          const auto out = place(sample({n, dim}, dtype), c.shifted);       // [N, dim]
          const auto grad = place(sample({tokens, dim}, dtype), c.shifted);  // [T, dim]
          std::optional<at::Tensor> weight;                                  // [N]
          if (weight_dtype) weight = at::rand({n}, at::kDouble).to(*weight_dtype);
          const auto run = [&](const at::Tensor& out_in, const at::Tensor& grad_in) {
            auto y = titan::cuda::moe_combine_forward(out_in, weight, slot, tokens, k);
            auto [d_out, d_weight] = titan::cuda::moe_combine_backward(grad_in, out_in, weight, slot, k);
            return weight ? Tensors{y, d_out, d_weight} : Tensors{y, d_out};
          };
          const auto got = in_every_order(dtype, [&] { return run(out, grad); });
          if (c.shifted) {  // one element at a time: the bits of the packs for y and d out
            const auto packed = run(out.clone(at::MemoryFormat::Contiguous), grad.clone(at::MemoryFormat::Contiguous));
            CHECK(at::equal(got[0], packed[0]));
            CHECK(at::equal(got[1], packed[1]));
          }
          const auto y = titan::detail::moe_combine_forward_aten(out, weight, slot, tokens, k);
          const auto [d_out, d_weight] = titan::detail::moe_combine_backward_aten(grad, out, weight, slot, k);
          std::optional<at::Tensor> weight_exact;
          if (weight) weight_exact = weight->to(at::kDouble);
          const auto out_exact = out.to(at::kDouble);
          const auto y_exact = titan::detail::moe_combine_forward_aten(out_exact, weight_exact, slot, tokens, k);
          const auto [d_out_exact, d_weight_exact] =
              titan::detail::moe_combine_backward_aten(grad.to(at::kDouble), out_exact, weight_exact, slot, k);
          check_close({got[0], got[1]}, {y, d_out}, {y_exact, d_out_exact}, dtype);
          if (weight) {  // a sum over the row: its terms' magnitudes bound what the order changes
            const auto magnitude = titan_test::moe_combine_magnitude(grad, out, slot, k);  // [N]
            CHECK((got[2].scalar_type() == d_weight.scalar_type()));
            CHECK(titan_test::sum_as_close_as(got[2], d_weight, d_weight_exact, magnitude, *weight_dtype));
          }
        }
}

TEST_CASE("emulated CUDA: a slot out of range is a device-side assert naming the block and thread") {
  const auto out = at::randn({3, 8}), slot = at::tensor({0, 7, 2}, at::kLong);  // 2 tokens of 2 slots: 7 is none
  try {
    titan::cuda::moe_combine_forward(out, std::nullopt, slot, 2, 2);
    FAIL("expected a device-side assert");
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    CHECK(message.find("device-side assert `s >= 0 && s < slots` failed") != std::string::npos);
    CHECK(message.find("in block (0, 0, 0), thread (1, 0, 0)") != std::string::npos);
  }
}

namespace {

/// The fields of ATen's FusedOptimizerTensorListMetadata<5> (MultiTensorApply.cuh) that titan's
/// AdamW functor reads, as many tensors and blocks per launch as ATen's.
struct AdamWLists {
  const void* addresses[titan::cuda::detail::kAdamWCopyLists][30];
  int64_t numel_for_tensor[30];
  const void* state_steps_addresses[30];
  unsigned char block_to_tensor[320];
  int block_to_chunk[320];
};

/// ATen's multi_tensor_apply_kernel: the functor on the launch's lists.
template <typename Functor, typename... Args>
__global__ void multi_tensor_apply_kernel(int64_t chunk_size, AdamWLists lists, Functor functor, Args... args) {
  functor(chunk_size, lists, args...);
}

/// titan::adamw_copy_'s functor launched as ATen's multi_tensor_apply_for_fused_optimizer launches
/// it (a block of 512 threads per chunk of `chunk_size` elements of a tensor), in one launch.
template <typename grad_t, typename copy_t>
void emulated_adamw_copy_(const std::vector<Tensors>& lists, const Tensors& steps, double lr, double weight_decay,
                          const float* grad_scale, const float* found_inf, int64_t chunk_size) {
  AdamWLists meta{};
  int blocks = 0;
  REQUIRE(steps.size() <= 30);
  for (size_t t = 0; t < steps.size(); ++t) {
    for (int l = 0; l < titan::cuda::detail::kAdamWCopyLists; ++l) meta.addresses[l][t] = lists[l][t].data_ptr();
    meta.numel_for_tensor[t] = lists[0][t].numel();
    meta.state_steps_addresses[t] = steps[t].data_ptr();
    for (int64_t c = 0; c * chunk_size < lists[0][t].numel(); ++c, ++blocks) {
      REQUIRE(blocks < 320);
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(t);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
    }
  }
  using Functor = titan::cuda::detail::AdamWCopyFunctor<grad_t, copy_t>;
  titan::cuda::detail::launch(
      multi_tensor_apply_kernel<Functor, double, double, double, double, double, const float*, const float*>,
      static_cast<unsigned>(blocks), 512, chunk_size, meta, Functor(), lr, 0.9, 0.95, weight_decay, 1e-8, grad_scale,
      found_inf);
}

}  // namespace

TEST_CASE("emulated CUDA: titan::adamw_copy_'s functor matches the ATen implementation, chunk by chunk") {
  // Parameters of two chunks and a partial third, of fewer elements than a block's threads, and of
  // one chunk exactly; a plain step with weight decay, one clipping inside the step (the scaled
  // gradient written back) and one skipped (found_inf: only the copies are written).
  constexpr int64_t kChunk = 600;
  constexpr double kLr = 0.01;
  for (const auto grad_dtype : {at::kFloat, at::kHalf, at::kBFloat16})
    for (const auto copy_dtype : {at::kBFloat16, at::kFloat})
      for (const auto variant : {"weight decay", "grad scale", "found inf"}) {
        CAPTURE(grad_dtype);
        CAPTURE(copy_dtype);
        CAPTURE(variant);
        at::manual_seed(7);
        const std::string kind = variant;
        const double weight_decay = kind == "weight decay" ? 0.1 : 0.0;
        std::vector<Tensors> lists(titan::cuda::detail::kAdamWCopyLists);  // params, grads, moments, copies
        Tensors steps;
        for (const int64_t n : {2 * kChunk + 37, int64_t{5}, kChunk}) {
          lists[0].push_back(sample({n}, at::kFloat));
          lists[1].push_back(sample({n}, grad_dtype));
          lists[2].push_back(sample({n}, at::kFloat, 0.1));
          lists[3].push_back(sample({n}, at::kFloat, 0.1).square());
          lists[4].push_back(at::zeros({n}, copy_dtype));
          steps.push_back(at::full({}, 7.0, at::kFloat));
        }
        const auto scale = at::full({1}, 2.5, at::kFloat), inf = at::full({1}, 1.0, at::kFloat);
        const float* grad_scale = kind == "grad scale" ? scale.data_ptr<float>() : nullptr;
        const float* found_inf = kind == "found inf" ? inf.data_ptr<float>() : nullptr;
        const auto copied = [&] {
          std::vector<Tensors> out;
          for (const auto& list : lists) {
            out.emplace_back();
            for (const auto& t : list) out.back().push_back(t.clone());
          }
          return out;
        };
        const auto got = in_every_order(grad_dtype, [&] {
          auto state = copied();
          TITAN_DISPATCH_KERNEL_DTYPES(grad_dtype, "grad", [&] {
            using grad_t = scalar_t;
            TITAN_DISPATCH_KERNEL_DTYPES(copy_dtype, "copy", [&] {
              emulated_adamw_copy_<grad_t, scalar_t>(state, steps, kLr, weight_decay, grad_scale, found_inf, kChunk);
            });
          });
          Tensors flat;
          for (const auto& list : state) flat.insert(flat.end(), list.begin(), list.end());
          return flat;
        });
        auto want = copied();
        titan::detail::adamw_copy_aten(want[0], want[1], want[2], want[3], want[4], steps, kLr, 0.9, 0.95, weight_decay,
                                       1e-8, grad_scale ? std::optional(scale) : std::nullopt,
                                       found_inf ? std::optional(inf) : std::nullopt);
        for (size_t l = 0; l < want.size(); ++l)
          for (size_t t = 0; t < want[l].size(); ++t) {
            CAPTURE(l);
            CAPTURE(t);
            const auto& g = got[l * want[l].size() + t];
            REQUIRE((g.scalar_type() == want[l][t].scalar_type()));
            // fp32 AdamW: the same formulas, fused multiply-adds where ATen's CPU kernel may round
            // twice; the gradients (written back only when scaled) and the copies: one rounding of theirs.
            CHECK(titan_test::within_rounding(g, want[l][t], want[l][t].scalar_type()));
            if (kind == "found inf" && l != titan::cuda::detail::kCopy)  // a skipped step: all but the copies untouched
              CHECK(at::equal(g, lists[l][t]));
          }
        if (kind != "found inf") CHECK_FALSE(at::equal(got[0], lists[0][0]));  // the step moved the parameters
      }
}

TEST_CASE("emulated CUDA: the 64-bit index path gives the bits of the 32-bit one") {
  // The operators take it only for tensors past int32's range, too large for a test: the kernels
  // are launched here directly, as the operators launch them, in both index types.
  namespace cuda = titan::cuda::detail;
  using Packs = std::integral_constant<int, 4>;  // fp32: 4 elements a pack
  using One = std::integral_constant<int, 1>;
  using Pair = std::integral_constant<int, 2>;
  at::manual_seed(6);
  const auto h = at::randn({6, 80});  // gate | up, as a fused projection gives them
  const auto gate = h.narrow(1, 0, 40), up = h.narrow(1, 40, 40);
  const int64_t n = gate.numel();
  const auto swiglu = [&](auto index, auto width) {
    using index_t = decltype(index);
    auto out = at::empty({6, 40});
    cuda::launch(cuda::swiglu_forward_kernel<float, index_t, width>, cuda::grid_stride_blocks(n / width),
                 cuda::kElementwiseThreads, gate.data_ptr<float>(), up.data_ptr<float>(), out.data_ptr<float>(), n,
                 cuda::divider<index_t>(40), 80, 80);
    return out;
  };
  CHECK(at::equal(swiglu(uint64_t{}, Packs{}), swiglu(uint32_t{}, Packs{})));
  CHECK(at::equal(swiglu(uint64_t{}, One{}), swiglu(uint32_t{}, Packs{})));

  const auto q = at::randn({2, 3, 4, 8}), k = at::randn({2, 3, 2, 8});  // [B, S, H, D]
  const auto cos = at::rand({3, 4}), sin = at::rand({3, 4});             // [S, D/2]
  const auto rope = [&](auto index, auto width) {
    using index_t = decltype(index);
    auto q_out = at::empty_like(q), k_out = at::empty_like(k);
    // Tokens of H x D elements, H x D/2 pairs.
    const cuda::RopeTensor<float, index_t> q_walk{q.data_ptr<float>(), q_out.data_ptr<float>(),
                                                  cuda::divider<index_t>(16), 32};
    const cuda::RopeTensor<float, index_t> k_walk{k.data_ptr<float>(), k_out.data_ptr<float>(),
                                                  cuda::divider<index_t>(8), 16};
    const int64_t pairs = (q.numel() + k.numel()) / 2;
    cuda::launch(cuda::rope_kernel<float, float, index_t, width>, cuda::grid_stride_blocks(pairs / (width / 2)),
                 cuda::kElementwiseThreads, q_walk, k_walk, cos.data_ptr<float>(), sin.data_ptr<float>(),
                 q.numel() / 2, pairs, cuda::divider<index_t>(4), cuda::divider<index_t>(3), 1.f);
    return Tensors{q_out, k_out};
  };
  for (const auto& [got, want] : {std::pair{rope(uint64_t{}, Packs{}), rope(uint32_t{}, Packs{})},
                                  std::pair{rope(uint64_t{}, Pair{}), rope(uint32_t{}, Packs{})}})
    for (size_t i = 0; i < got.size(); ++i) CHECK(at::equal(got[i], want[i]));
  const auto [q_want, k_want] = titan::cuda::rope_forward(q, k, cos, sin);
  CHECK(at::equal(rope(uint64_t{}, Packs{})[0], q_want));

  // The float8 cast of a weight's transpose [40, 6] with a scale per column of its memory.
  const auto w = at::randn({6, 40}), amax = w.abs().amax(1, true).t();  // hp wᵀ [40, 6], amax [1, 6]
  const auto cast = [&](auto index, auto width) {
    using index_t = decltype(index);
    auto data = at::empty({6, 40}, at::TensorOptions().dtype(at::kFloat8_e4m3fn)).t();
    auto scale = at::empty({1, 6}), inverse = at::empty({1, 6});
    const cuda::AmaxWalk<float, index_t> walk{{amax.data_ptr(), false, 1}, cuda::divider<index_t>(40),
                                              cuda::divider<index_t>(6)};
    cuda::launch(cuda::float8_cast_kernel<float, c10::Float8_e4m3fn, index_t, width>,
                 cuda::grid_stride_blocks(240 / width), cuda::kElementwiseThreads, w.data_ptr<float>(),
                 data.data_ptr<c10::Float8_e4m3fn>(), scale.data_ptr<float>(), inverse.data_ptr<float>(),
                 index_t{240}, walk, 448.f, false);
    return Tensors{titan_test::bits_of(data), scale, inverse};
  };
  for (const auto& [got, want] : {std::pair{cast(uint64_t{}, Packs{}), cast(uint32_t{}, Packs{})},
                                  std::pair{cast(uint64_t{}, One{}), cast(uint32_t{}, Packs{})}})
    for (size_t i = 0; i < got.size(); ++i) CHECK(at::equal(got[i], want[i]));
  const auto data_want = std::get<0>(titan::cuda::float8_cast(w.t(), amax, at::kFloat8_e4m3fn, false));
  CHECK(at::equal(cast(uint64_t{}, Packs{})[0], titan_test::bits_of(data_want)));
}

TEST_CASE("emulated CUDA: inputs the kernels do not take go to the ATen implementation, bit for bit") {
  at::manual_seed(5);
  // fp64 everywhere: each operator's ATen result, bitwise.
  const auto x = at::randn({3, 8}, at::kDouble), delta = at::randn({3, 8}, at::kDouble);  // [3, 8]
  const auto w = at::randn({8}, at::kDouble);                                                // [8]
  const auto [sum, normed, rstd] = titan::cuda::add_rms_norm_forward(x, delta, w, 1e-5);
  const auto [sum_want, normed_want, rstd_want] = titan::detail::add_rms_norm_forward_aten(x, delta, w, 1e-5);
  CHECK(at::equal(normed, normed_want));
  CHECK(at::equal(rstd, rstd_want));
  const auto q = at::randn({1, 3, 2, 4}, at::kDouble), k = at::randn({1, 3, 1, 4}, at::kDouble);
  const auto cos = at::randn({3, 2}, at::kDouble), sin = at::randn({3, 2}, at::kDouble);
  CHECK(at::equal(std::get<0>(titan::cuda::rope_forward(q, k, cos, sin)),
                  std::get<0>(titan::detail::rope_forward_aten(q, k, cos, sin))));
  CHECK(at::equal(titan::cuda::swiglu_forward(x, delta), titan::detail::swiglu_forward_aten(x, delta)));
  const auto logits = at::randn({4, 6}, at::kDouble), targets = at::tensor({0, 5, 2, 1}, at::kLong);
  CHECK(at::equal(std::get<1>(titan::cuda::cross_entropy_loss_and_grad(logits, targets, -100, 0, true, 0.25)),
                  std::get<1>(titan::detail::cross_entropy_loss_and_grad_aten(logits, targets, -100, 24, true, 0.25))));
  // A backward given other arguments than its forward gave: an rstd in bf16, a gradient in another dtype.
  const auto xf = x.to(at::kFloat), df = delta.to(at::kFloat), wf = w.to(at::kFloat);
  const auto [s, n, r] = titan::cuda::add_rms_norm_forward(xf, df, wf, 1e-5);
  const auto r_bf16 = r.to(at::kBFloat16);
  CHECK(at::equal(std::get<0>(titan::cuda::add_rms_norm_backward(std::nullopt, n, s, wf, r_bf16, 1e-5)),
                  std::get<0>(titan::detail::add_rms_norm_backward_aten(std::nullopt, n, s, wf, r_bf16, 1e-5))));
  const auto grad_bf16 = n.to(at::kBFloat16);
  CHECK(at::equal(std::get<0>(titan::cuda::swiglu_backward(grad_bf16, xf, df)),
                  std::get<0>(titan::detail::swiglu_backward_aten(grad_bf16, xf, df))));
  // The combine of fp64 rows, and of bf16 rows by an fp16 weight.
  const auto slot = at::tensor({1, 0, 2}, at::kLong), weight = at::rand({3}, at::kDouble);
  CHECK(at::equal(titan::cuda::moe_combine_forward(x, weight, slot, 2, 2),
                  titan::detail::moe_combine_forward_aten(x, weight, slot, 2, 2)));
  const auto rows = x.to(at::kBFloat16), weight_fp16 = weight.to(at::kHalf);
  CHECK(at::equal(titan::cuda::moe_combine_forward(rows, weight_fp16, slot, 2, 2),
                  titan::detail::moe_combine_forward_aten(rows, weight_fp16, slot, 2, 2)));
  // The float8 cast of fp64, of a column slice (rows with gaps), by an amax varying along two
  // dimensions, of an empty tensor, and with an fp16 amax for fp32 values.
  const auto cast_matches = [](const at::Tensor& hp, const at::Tensor& amax) {
    const auto [data, scale, inverse] = titan::cuda::float8_cast(hp, amax, at::kFloat8_e4m3fn, false);
    const auto [data_want, scale_want, inverse_want] =
        titan::detail::float8_cast_aten(hp, amax, at::kFloat8_e4m3fn, false);
    return at::equal(titan_test::bits_of(data), titan_test::bits_of(data_want)) && at::equal(scale, scale_want) &&
           at::equal(inverse, inverse_want);
  };
  CHECK(cast_matches(x, x.abs().max()));
  CHECK(cast_matches(xf.narrow(1, 0, 5), xf.abs().max()));
  const auto cube = at::randn({2, 3, 4});
  CHECK(cast_matches(cube, cube.abs().amax(2, true)));
  CHECK(cast_matches(at::empty({0, 4}), at::ones({1, 4})));
  CHECK(cast_matches(xf, xf.abs().max().to(at::kHalf)));
}

// Kernels of the emulator's own checks: a block sum over shared memory with and without its
// barrier, a barrier only thread 0 reaches, and a warp sum by shuffles.
namespace {

template <bool kBarrier>
__global__ void block_sum_kernel(const float* x, float* out) {
  __shared__ float values[64];
  values[threadIdx.x] = x[threadIdx.x];
  if (kBarrier) __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int i = 0; i < 64; ++i) total += values[i];
    *out = total;
  }
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x == 0) __syncthreads();
}

__global__ void warp_sum_kernel(const float* x, float* out) {
  float value = x[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  out[threadIdx.x] = value;
}

/// The block sum of 64 ones in `order`.
float block_sum_in(Order order, bool barrier) {
  titan_emulation::set_order(order);
  const auto x = at::ones({64}), out = at::zeros({1});
  auto kernel = barrier ? block_sum_kernel<true> : block_sum_kernel<false>;
  titan::cuda::detail::launch(kernel, 1, 64, x.data_ptr<float>(), out.data_ptr<float>());
  titan_emulation::set_order(Order::ascending);
  return out.item<float>();
}

/// The message of the error `launch` throws.
template <typename Launch>
std::string launch_error(const Launch& launch) {
  try {
    launch();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("emulated CUDA: the emulator shows a race, a barrier not every thread reaches and a bad launch") {
  // Without its barrier, thread 0 reads shared memory that later threads have not written yet when
  // it runs first: another result than in the other order, as in_every_order would report.
  CHECK(block_sum_in(Order::descending, false) == 64.f);
  CHECK(block_sum_in(Order::ascending, false) != 64.f);
  for (const auto order : {Order::ascending, Order::descending, Order::shuffled})
    CHECK(block_sum_in(order, true) == 64.f);

  const auto stuck = launch_error([] { titan::cuda::detail::launch(divergent_barrier_kernel, 2, 64); });
  CHECK(stuck.find("threads of block (0, 0, 0) wait at barriers that are never complete: 1 at __syncthreads") !=
        std::string::npos);
  const auto too_big = launch_error([] { titan::cuda::detail::launch(divergent_barrier_kernel, 1, 2048); });
  CHECK(too_big.find("invalid configuration argument: grid (1, 1, 1), block (2048, 1, 1)") != std::string::npos);
}

TEST_CASE("emulated CUDA: __shfl_down_sync moves values down a warp; lanes past its end keep their own") {
  const auto x = at::arange(64, at::kFloat), out = at::empty({64});
  titan::cuda::detail::launch(warp_sum_kernel, 1, 64, x.data_ptr<float>(), out.data_ptr<float>());
  CHECK(out[0].item<float>() == 31.f * 32.f / 2.f);            // lane 0: its warp's sum
  CHECK(out[32].item<float>() == (32.f + 63.f) * 32.f / 2.f);  // the second warp's, apart from the first
  CHECK(out[31].item<float>() == 31.f * 32.f);  // lane 31 gets its own value at every step: doubled 5 times
}
