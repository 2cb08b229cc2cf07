// titan/fused/moe_combine.hpp: titan::moe_combine against the unfused combine titan/moe.hpp ran
// before (each row times its weight, cast to out's dtype, written to its slot by index_put_, each
// token's k slots summed): output and the gradients of out and of the weight bitwise on the ATen
// path (fp32, bf16, fp64; without a weight, with an fp32 weight, with the weight in out's dtype;
// every slot kept or some dropped), as close to the fp64 result as the unfused operators with
// titan's CUDA kernel (fused_testing.hpp), under per-operator activation checkpointing, and the
// errors.
#include "fused_testing.hpp"

#include <string>
#include <vector>

namespace {

using titan_test::device;
using titan_test::error_of;
using torch::Tensor;

/// How the rows are weighed: not at all (score_before_experts), by fp32 weights (fp32_weighting),
/// or by the weights cast to out's dtype first (the default).
enum class Weighing { None, Fp32, OutDtype };

/// A combine's inputs: out [N, dim], fp32 (fp64 for fp64 out) routing weights [N], distinct slots
/// [N] of tokens·k (all of them, or with every third one and all of token 0's dropped), and an
/// output gradient [tokens, dim].
struct Inputs {
  Tensor out, weight, slot, grad;
  int64_t tokens, k;
};
Inputs inputs(torch::Dtype dtype, int64_t tokens, int64_t k, int64_t dim, bool dropped, uint64_t seed) {
  torch::manual_seed(seed);
  auto slot = torch::randperm(tokens * k, torch::kLong);  // [T·k]
  if (dropped) slot = slot.index({(torch::arange(tokens * k) % 3 != 1) & (slot.div(k, "floor") != 0)});
  const int64_t n = slot.size(0);
  const auto weight_dtype = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
  return {torch::randn({n, dim}, torch::kDouble).to(dtype).to(device()),
          torch::rand({n}, torch::kDouble).to(weight_dtype).to(device()), slot.to(device()),
          torch::randn({tokens, dim}, torch::kDouble).to(dtype).to(device()), tokens, k};
}

/// y and the gradients of out and of the weight for sum(y * grad), by `combine(out, weight or
/// undefined)`; the weight is cast to out's dtype first for Weighing::OutDtype, as titan::MoE does.
struct Result {
  Tensor y, d_out, d_weight;
};
template <typename Combine>
Result run(const Combine& combine, const Inputs& in, Weighing weighing) {
  auto out = in.out.detach().requires_grad_(true), weight = in.weight.detach().requires_grad_(true);
  const auto w = weighing == Weighing::None       ? Tensor()
                 : weighing == Weighing::Fp32     ? weight
                                                  : weight.to(out.scalar_type());
  auto y = combine(out, w);
  (y * in.grad).sum().backward();
  return {y.detach(), out.grad(), weighing == Weighing::None ? Tensor() : weight.grad()};
}

/// The combine as titan/moe.hpp computed it before titan::moe_combine.
Tensor unfused_combine(const Tensor& out, const Tensor& weight, const Tensor& slot, int64_t tokens, int64_t k) {
  const int64_t dim = out.size(1);
  const auto rows = weight.defined() ? (out * weight.unsqueeze(1)).to(out.scalar_type()) : out;  // [N, dim]
  auto slots = slot.size(0) == tokens * k ? torch::empty({tokens * k, dim}, out.options())
                                          : torch::zeros({tokens * k, dim}, out.options());  // [T·k, dim]
  slots.index_put_({slot}, rows);
  return slots.view({tokens, k, dim}).sum(1);  // [T, dim]
}

Result unfused(const Inputs& in, Weighing weighing) {
  return run([&](const Tensor& out, const Tensor& w) { return unfused_combine(out, w, in.slot, in.tokens, in.k); },
             in, weighing);
}

Result fused(const Inputs& in, Weighing weighing) {
  return run(
      [&](const Tensor& out, const Tensor& w) {
        return titan::moe_combine(out, w.defined() ? std::optional<Tensor>(w) : std::nullopt, in.slot, in.tokens,
                                  in.k);
      },
      in, weighing);
}

/// The inputs in fp64 (the weight's values as the operator sees them).
Inputs in_fp64(const Inputs& in, Weighing weighing) {
  auto weight = weighing == Weighing::OutDtype ? in.weight.to(in.out.scalar_type()) : in.weight;
  return {in.out.to(torch::kDouble), weight.to(torch::kDouble), in.slot, in.grad.to(torch::kDouble), in.tokens, in.k};
}

/// The magnitude of the weight gradient's terms per row [N] (titan_test::moe_combine_magnitude).
Tensor magnitude(const Inputs& in) { return titan_test::moe_combine_magnitude(in.grad, in.out, in.slot, in.k); }

/// A layer combining its experts' rows: out = proj(x) [N, 16], weight = sigmoid(gate(x)) [N].
struct CombineLayerImpl : torch::nn::Module {
  CombineLayerImpl() {
    proj = register_module("proj", torch::nn::Linear(torch::nn::LinearOptions(8, 16).bias(false)));
    gate = register_module("gate", torch::nn::Linear(torch::nn::LinearOptions(8, 1).bias(false)));
  }
  Tensor forward(const Tensor& x, const Tensor& slot, int64_t tokens, int64_t k) {  // x [N, 8]
    const auto weight = torch::sigmoid(titan::call(gate, x)).view({-1});           // [N]
    return titan::moe_combine(titan::call(proj, x), weight, slot, tokens, k);       // [T, 16]
  }
  torch::nn::Linear proj{nullptr}, gate{nullptr};
};
TORCH_MODULE(CombineLayer);

}  // namespace

TEST_CASE("fused moe_combine: output and gradients equal the unfused combine") {
  titan_test::fused_kernels_registered();
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble})
    for (const auto weighing : {Weighing::None, Weighing::Fp32, Weighing::OutDtype})
      for (const bool dropped : {false, true}) {
        CAPTURE(dtype);
        CAPTURE(static_cast<int>(weighing));
        CAPTURE(dropped);
        const auto in = inputs(dtype, 9, 3, 24, dropped, 5);  // [N, 24], 9 tokens of 3 slots
        const auto want = unfused(in, weighing), got = fused(in, weighing);
        const auto exact = unfused(in_fp64(in, weighing), weighing == Weighing::OutDtype ? Weighing::Fp32 : weighing);
        titan_test::check_matches_unfused({got.y, got.d_out}, {want.y, want.d_out}, dtype, {exact.y, exact.d_out});
        if (dropped) CHECK(titan_test::same_values(got.y[0], torch::zeros({24}, dtype)));  // token 0: all dropped
        if (weighing == Weighing::None) {
          CHECK_FALSE(got.d_weight.defined());
          continue;
        }
        // The weight's gradient (of the fp32 weight: for Weighing::OutDtype, rounded to out's dtype first).
        REQUIRE((got.d_weight.scalar_type() == want.d_weight.scalar_type()));
        const auto rounded = weighing == Weighing::OutDtype ? dtype : want.d_weight.scalar_type();
        CHECK(titan_test::sum_as_close_as(got.d_weight, want.d_weight, exact.d_weight, magnitude(in), rounded));
        if (!titan_test::fused_kernels_run() || dtype == torch::kDouble)
          CHECK(titan_test::same_values(got.d_weight, want.d_weight));
      }
}

TEST_CASE("fused moe_combine: inputs one element past a 16-byte boundary give the bits of aligned ones") {
  // On a GPU the kernels' two paths (16-byte packs, one element at a time) against each other: the
  // same bits for y and d out (element-wise); d weight is a sum in another order, as close to the
  // exact value as the packs' up to the rounding that order can change.
  // On the CPU (the ATen path) the same operators twice.
  titan_test::fused_kernels_registered();
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    CAPTURE(dtype);
    auto in = inputs(dtype, 7, 4, 40, true, 6);  // [N, 40]
    const auto packs = fused(in, Weighing::OutDtype);
    in.out = titan_test::shifted(in.out);  // saved for the backward too: both directions one element at a time
    const auto single = fused(in, Weighing::OutDtype);
    CHECK(titan_test::same_values(single.y, packs.y));
    CHECK(titan_test::same_values(single.d_out, packs.d_out));
    const auto exact = unfused(in_fp64(in, Weighing::OutDtype), Weighing::Fp32);
    CHECK(titan_test::sum_as_close_as(single.d_weight, packs.d_weight, exact.d_weight, magnitude(in), dtype));
  }
}

TEST_CASE("fused moe_combine: under per-operator activation checkpointing the gradients are unchanged") {
  titan_test::fused_kernels_registered();
  torch::manual_seed(8);
  const auto x = torch::randn({10, 8}, device());                                          // [N, 8]
  const auto slot = torch::randperm(12, torch::kLong).narrow(0, 0, 10).to(device());  // 10 of 4·3 slots
  titan_test::check_gradients_under_op_ac(
      [] {
        torch::manual_seed(9);
        return CombineLayer();
      },
      [&](CombineLayer& layer) { return titan::call(layer, x, slot, int64_t{4}, int64_t{3}).pow(2).sum(); },
      {"aten::mm"});
}

TEST_CASE("fused moe_combine: errors name what is wrong") {
  const auto out = torch::randn({6, 4}, device()), weight = torch::rand({6}, device());
  const auto slot = torch::arange(6, torch::TensorOptions(torch::kLong).device(device()));
  const auto combine = [&](const Tensor& o, const std::optional<Tensor>& w, const Tensor& s, int64_t tokens,
                           int64_t k) { return error_of([&] { titan::moe_combine(o, w, s, tokens, k); }); };
  CHECK(combine(out.view({-1}), weight, slot, 3, 2).find("out must be the experts' output rows [N, dim] of a floating "
                                                         "dtype, got [24] Float") != std::string::npos);
  CHECK(combine(out.to(torch::kLong), weight, slot, 3, 2).find("got [6, 4] Long") != std::string::npos);
  CHECK(combine(out, weight, slot.narrow(0, 0, 5), 3, 2)
            .find("slot must be [N] = [6] int64 (each row's t·k + j), got [5] Long") != std::string::npos);
  CHECK(combine(out, weight, slot.to(torch::kInt), 3, 2).find("got [6] Int") != std::string::npos);
  CHECK(combine(out, weight.narrow(0, 0, 4), slot, 3, 2)
            .find("weight must be [N] = [6] of a floating dtype (one routing weight per row), got [4] Float") !=
        std::string::npos);
  CHECK(combine(out, weight, slot, 2, 2).find("6 rows for 2 tokens of 2 slots each (at most 4)") != std::string::npos);
  CHECK(combine(out, weight, slot, 3, 0).find("tokens (3) must be >= 0 and k (0) >= 1") != std::string::npos);
  const auto grad = torch::randn({3, 5}, device());  // [T, 5]: out has 4 columns
  CHECK(error_of([&] { titan::detail::moe_combine_backward_aten(grad, out, weight, slot, 2); })
            .find("the output gradient must be [tokens, 4] Float on") != std::string::npos);
}
