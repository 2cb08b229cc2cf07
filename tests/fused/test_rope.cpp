// titan/fused/rope.hpp: titan::rope against RoPE written two other ways: the complex multiply of
// torchtitan (the model's formulation before the operator: output and gradients bitwise on the
// ATen path in fp32, bf16 and fp64, within one rounding with titan's CUDA kernel) and Meta's
// real-arithmetic formula in fp64 (the pair layout and the sign of the rotation); grouped
// key/value heads, bf16 tables, per-operator activation checkpointing, and the errors.
#include "fused_testing.hpp"

#include <cmath>
#include <string>

namespace {

using titan_test::device;
using titan_test::error_of;
using torch::Tensor;

/// The rotated q and k and the gradients of q and k of sum(q' * wq) + sum(k' * wk), by `fn`.
struct Result {
  Tensor q, k, d_q, d_k;
};
template <typename Fn>
Result run(Fn&& fn, const Tensor& q, const Tensor& k, const Tensor& wq, const Tensor& wk) {
  auto a = q.detach().requires_grad_(true), b = k.detach().requires_grad_(true);
  auto [qr, kr] = fn(a, b);
  ((qr * wq).sum() + (kr * wk).sum()).backward();
  return {qr.detach(), kr.detach(), a.grad(), b.grad()};
}

/// torchtitan's formulation: pairs as complex numbers times cos + i sin, in fp32 (fp64 for fp64).
Tensor complex_rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const auto real = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto rotation = torch::complex(cos.to(real), sin.to(real)).view({1, cos.size(0), 1, cos.size(1)});
  auto pairs = torch::view_as_complex(x.to(real).unflatten(-1, {-1, 2}));  // [B, S, H, D/2] complex
  return torch::view_as_real(pairs * rotation).flatten(-2).to(x.scalar_type());
}

/// Meta's formula on real halves of the pairs, in fp64: x'[2i] = x[2i] cos - x[2i+1] sin, x'[2i+1] = x[2i] sin + x[2i+1] cos.
Tensor real_rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  auto pairs = x.to(torch::kDouble).unflatten(-1, {-1, 2});  // [B, S, H, D/2, 2]
  auto even = pairs.select(-1, 0), odd = pairs.select(-1, 1);
  auto c = cos.to(torch::kDouble).view({1, cos.size(0), 1, cos.size(1)});
  auto s = sin.to(torch::kDouble).view({1, sin.size(0), 1, sin.size(1)});
  return torch::stack({even * c - odd * s, even * s + odd * c}, -1).flatten(-2);  // [B, S, H, D] fp64
}

/// Tables of S positions and D/2 frequencies (Llama's, theta 10000).
std::pair<Tensor, Tensor> tables(int64_t seq, int64_t head_dim) {
  auto inv_freq = 1.0 / torch::pow(10000.0, torch::arange(0, head_dim, 2, torch::kDouble) / head_dim);  // [D/2]
  auto angles = torch::outer(torch::arange(seq, torch::kDouble), inv_freq);                          // [S, D/2]
  return {angles.cos().to(torch::kFloat).to(device()), angles.sin().to(torch::kFloat).to(device())};
}

/// Attention's projections and their rotation: rope(wq x, wk x) (3 query heads per key head).
struct ProjectImpl : torch::nn::Module {
  ProjectImpl() {
    wq = register_module("wq", torch::nn::Linear(torch::nn::LinearOptions(16, 48).bias(false)));
    wk = register_module("wk", torch::nn::Linear(torch::nn::LinearOptions(16, 16).bias(false)));
  }
  Tensor forward(const Tensor& x, const Tensor& cos, const Tensor& sin) {  // x: [2, 5, 16]
    auto q = titan::call(wq, x).view({2, 5, 6, 8});                        // [2, 5, 6, 8]
    auto k = titan::call(wk, x).view({2, 5, 2, 8});                        // [2, 5, 2, 8]
    auto [qr, kr] = titan::rope(q, k, cos, sin);
    return qr.sum(2) * kr.sum(2);  // [2, 5, 8]
  }
  torch::nn::Linear wq{nullptr}, wk{nullptr};
};
TORCH_MODULE(Project);

}  // namespace

TEST_CASE("fused rope: output and gradients equal the complex multiply, and Meta's formula") {
  titan_test::fused_kernels_registered();
  const auto [cos, sin] = tables(5, 8);  // [5, 4] fp32
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
    CAPTURE(dtype);
    torch::manual_seed(5);
    auto q = torch::randn({2, 5, 6, 8}, torch::kDouble).to(dtype).to(device());   // [2, 5, 6, 8]
    auto k = torch::randn({2, 5, 2, 8}, torch::kDouble).to(dtype).to(device());   // [2, 5, 2, 8]: grouped heads
    auto wq = torch::randn({2, 5, 6, 8}, torch::kDouble).to(dtype).to(device());  // [2, 5, 6, 8]
    auto wk = torch::randn({2, 5, 2, 8}, torch::kDouble).to(dtype).to(device());  // [2, 5, 2, 8]
    const auto want = run(
        [&](const Tensor& a, const Tensor& b) { return std::make_pair(complex_rope(a, cos, sin), complex_rope(b, cos, sin)); },
        q, k, wq, wk);
    const auto got = run([&](const Tensor& a, const Tensor& b) { return titan::rope(a, b, cos, sin); }, q, k, wq, wk);
    titan_test::check_matches_unfused({got.q, got.k, got.d_q, got.d_k}, {want.q, want.k, want.d_q, want.d_k}, dtype);
    // The layout and the sign: Meta's real formula (the gradient is the rotation by -theta of wq).
    const double tolerance = dtype == torch::kBFloat16 ? 2e-2 : dtype == torch::kFloat ? 1e-6 : 1e-12;
    const auto reference = real_rope(q, cos, sin), inverse = real_rope(wq, cos, -sin);
    CHECK(torch::allclose(got.q.to(torch::kDouble), reference, tolerance, tolerance));
    CHECK(torch::allclose(got.d_q.to(torch::kDouble), inverse, tolerance, tolerance));
    CHECK(torch::allclose(got.k.to(torch::kDouble), real_rope(k, cos, sin), tolerance, tolerance));
  }
}

TEST_CASE("fused rope: q and k one element past a 16-byte boundary give the bits of aligned ones") {
  // titan's CUDA kernel takes 16-byte packs of pairs where every token starts at a 16-byte boundary,
  // else one pair at a time, with the same arithmetic (docs/fused.md): on a GPU, both paths against
  // each other; on the CPU (the ATen path) the same operators twice.
  titan_test::fused_kernels_registered();
  const auto [cos, sin] = tables(5, 8);  // [5, 4] fp32
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    CAPTURE(dtype);
    torch::manual_seed(8);
    const auto q = torch::randn({2, 5, 6, 8}).to(dtype).to(device());   // [2, 5, 6, 8]
    const auto k = torch::randn({2, 5, 2, 8}).to(dtype).to(device());   // [2, 5, 2, 8]
    const auto wq = torch::randn({2, 5, 6, 8}).to(dtype).to(device());  // [2, 5, 6, 8]
    const auto wk = torch::randn({2, 5, 2, 8}).to(dtype).to(device());  // [2, 5, 2, 8]
    const auto rope = [&](const Tensor& a, const Tensor& b) { return titan::rope(a, b, cos, sin); };
    const auto packs = run(rope, q, k, wq, wk);
    const auto single = run(rope, titan_test::shifted(q), titan_test::shifted(k), wq, wk);
    CHECK(titan_test::same_values(single.q, packs.q));
    CHECK(titan_test::same_values(single.k, packs.k));
    CHECK(titan_test::same_values(single.d_q, packs.d_q));
    CHECK(titan_test::same_values(single.d_k, packs.d_k));
  }
}

TEST_CASE("fused rope: bf16 tables (FSDP's cast of a block's inputs) are rotated in fp32 as given") {
  titan_test::fused_kernels_registered();
  const auto [cos, sin] = tables(5, 8);
  const auto cos16 = cos.to(torch::kBFloat16), sin16 = sin.to(torch::kBFloat16);  // [5, 4]
  torch::manual_seed(6);
  auto q = torch::randn({1, 5, 4, 8}, device()), k = torch::randn({1, 5, 4, 8}, device());
  auto [qr, kr] = titan::rope(q, k, cos16, sin16);
  CHECK(torch::allclose(qr.to(torch::kDouble), real_rope(q, cos16, sin16), 1e-6, 1e-6));
  CHECK(torch::allclose(kr.to(torch::kDouble), real_rope(k, cos16, sin16), 1e-6, 1e-6));
}

TEST_CASE("fused rope: under per-operator activation checkpointing the gradients are unchanged") {
  titan_test::fused_kernels_registered();
  const auto [cos, sin] = tables(5, 8);
  const auto x = torch::randn({2, 5, 16}, device());  // [2, 5, 16]
  titan_test::check_gradients_under_op_ac(
      [] {
        torch::manual_seed(7);
        return Project();
      },
      [&cos = cos, &sin = sin, &x](Project& project) { return titan::call(project, x, cos, sin).pow(2).sum(); },
      {"aten::mm"});  // the rotation recomputed in the backward, every matmul kept
}

TEST_CASE("fused rope: errors name what is wrong") {
  const auto [cos, sin] = tables(5, 8);
  const auto q = torch::randn({2, 5, 6, 8}, device()), k = torch::randn({2, 5, 2, 8}, device());
  CHECK(error_of([&] { titan::rope(q, k.narrow(3, 0, 6), cos, sin); })
            .find("needs q [B, S, Hq, D] and k [B, S, Hk, D] with the same B, S and an even head size D, got [2, 5, "
                  "6, 8] and [2, 5, 2, 6]") != std::string::npos);
  CHECK(error_of([&] { titan::rope(q.view({10, 6, 8}), k, cos, sin); }).find("needs q [B, S, Hq, D]") !=
        std::string::npos);
  CHECK(error_of([&] { titan::rope(q, k.to(torch::kDouble), cos, sin); })
            .find("q and k must have the same floating dtype, got Float and Double") != std::string::npos);
  CHECK(error_of([&] { titan::rope(q, k, cos.narrow(0, 0, 4), sin); })
            .find("cos and sin must be [S, D/2] = [5, 4] (one row per position of q and k), got [4, 4] and [5, 4]") !=
        std::string::npos);
  CHECK(error_of([&] { titan::rope(q, k, cos.to(torch::kLong), sin); })
            .find("cos and sin must be floating point, got Long and Float") != std::string::npos);
  const auto learned = cos.clone().requires_grad_(true);
  CHECK(error_of([&] { titan::rope(q.requires_grad_(true), k, learned, sin); })
            .find("cos and sin must not require a gradient") != std::string::npos);
}
