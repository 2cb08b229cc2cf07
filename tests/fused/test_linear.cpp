// titan/fused/linear.hpp: titan::linear_fused against the separate linear layers it replaces
// (outputs and gradients, fp32, bf16 and fp64; an output that reaches no loss; per-operator
// activation checkpointing), its backward summing the input's gradient in the GEMMs, the fused
// operators reading its outputs in place (column slices), and the errors.
#include "fused_testing.hpp"
#include "../support/op_events.hpp"

#include <string>
#include <vector>

namespace {

using titan_test::device;
using titan_test::error_of;
using torch::Tensor;

/// The outputs of x [4, 6, 16] by weights of 8, 4 and 4 rows, and the gradients of x and the
/// weights of sum(sin(out_i) * (i + 1)), by linear_fused or by one linear each.
struct Result {
  std::vector<Tensor> outputs, grads;
};
Result run(bool fused, torch::Dtype dtype) {
  torch::manual_seed(1);
  auto x = torch::randn({4, 6, 16}, torch::kDouble).to(dtype).to(device()).requires_grad_(true);  // [4, 6, 16]
  std::vector<Tensor> weights;
  for (int64_t rows : {8, 4, 4})
    weights.push_back((torch::randn({rows, 16}, torch::kDouble) / 4).to(dtype).to(device()).requires_grad_(true));
  std::vector<Tensor> outputs;
  if (fused) {
    outputs = titan::linear_fused(x, weights);
  } else {
    for (const auto& w : weights) outputs.push_back(torch::nn::functional::linear(x, w));
  }
  auto loss = torch::zeros({}, x.options());
  for (size_t i = 0; i < outputs.size(); ++i) loss = loss + outputs[i].sin().sum() * static_cast<double>(i + 1);
  loss.backward();
  Result result;
  for (const auto& out : outputs) result.outputs.push_back(out.detach());
  result.grads.push_back(x.grad());
  for (const auto& w : weights) result.grads.push_back(w.grad());
  return result;
}

/// Whether `got` is `want` to within the error of a GEMM in `dtype` summed in another order.
bool close(const Tensor& got, const Tensor& want, torch::Dtype dtype) {
  const double tolerance = dtype == torch::kBFloat16 ? 2e-2 : dtype == torch::kFloat ? 1e-5 : 1e-12;
  return torch::allclose(got.to(torch::kDouble).cpu(), want.to(torch::kDouble).cpu(), tolerance, tolerance);
}

/// q [B, S, Hq x D] and k of one GEMM's output, as the fused projection hands them to RoPE.
struct LinearFusedModuleImpl : torch::nn::Module {
  LinearFusedModuleImpl() {
    wq = register_parameter("wq", torch::randn({8, 16}) / 4);
    wk = register_parameter("wk", torch::randn({4, 16}) / 4);
  }
  Tensor forward(const Tensor& x) {  // x [2, 5, 16]
    const auto parts = titan::linear_fused(x, {wq, wk});
    return parts[0].pow(2).sum() + parts[1].sin().sum();
  }
  Tensor wq, wk;
};
TORCH_MODULE(LinearFusedModule);

}  // namespace

TEST_CASE("fused linear: outputs and gradients equal one linear layer per weight") {
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
    CAPTURE(dtype);
    const auto want = run(false, dtype), got = run(true, dtype);
    for (size_t i = 0; i < want.outputs.size(); ++i) {
      CAPTURE(i);
      CHECK((got.outputs[i].sizes() == want.outputs[i].sizes()));
      CHECK(close(got.outputs[i], want.outputs[i], dtype));
    }
    for (size_t i = 0; i < want.grads.size(); ++i) {
      CAPTURE(i);  // 0: the input, then each weight
      CHECK(close(got.grads[i], want.grads[i], dtype));
    }
  }
}

TEST_CASE("fused linear: the input's gradient is summed inside the GEMMs, and an unused output gives none") {
  torch::manual_seed(2);
  auto x = torch::randn({3, 16}, device()).requires_grad_(true);  // [3, 16]
  auto w0 = torch::randn({8, 16}, device()).requires_grad_(true);  // [8, 16]
  auto w1 = torch::randn({4, 16}, device()).requires_grad_(true);  // [4, 16]
  auto w2 = torch::randn({4, 16}, device()).requires_grad_(true);  // [4, 16]
  const auto parts = titan::linear_fused(x, {w0, w1, w2});
  const auto loss = parts[0].sum() + parts[2].pow(2).sum();  // parts[1] reaches no loss
  std::vector<std::string> ops;
  {
    titan_test::OpEvents events;
    loss.backward();
    for (const auto& e : events.events())
      if (e.name == "aten::add" || e.name == "aten::add_" || e.name == "aten::addmm_" || e.name == "aten::mm")
        ops.push_back(e.name);
  }
  // d x = 1 w0 + (2 p2) w2: one mm, one addmm_; d w0 and d w2: one mm each; no add.
  CHECK((ops == std::vector<std::string>{"aten::mm", "aten::mm", "aten::addmm_", "aten::mm"}));
  CHECK(torch::allclose(x.grad(), torch::ones({3, 8}, device()).mm(w0) + (2 * parts[2].detach()).mm(w2), 1e-5, 1e-5));
  CHECK_FALSE(w1.grad().defined());
}

TEST_CASE("fused linear: under per-operator activation checkpointing the gradients are unchanged") {
  const auto x = torch::randn({2, 5, 16}, device());  // [2, 5, 16]
  titan_test::check_gradients_under_op_ac(
      [] {
        torch::manual_seed(3);
        return LinearFusedModule();
      },
      [&x](LinearFusedModule& module) { return module->forward(x); }, {"aten::mm"});
}

TEST_CASE("fused swiglu and rope read a fused projection's outputs in place, as contiguous copies") {
  titan_test::fused_kernels_registered();
  torch::manual_seed(4);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    CAPTURE(dtype);
    // titan's kernels compute each element alike whatever the layout: bitwise. ATen's CPU loops
    // split strided rows into vector and scalar parts differently (exp differs in the last bit).
    auto same = [dtype](const Tensor& got, const Tensor& want) {
      return titan_test::fused_kernels_run() ? titan_test::same_values(got, want)
                                             : titan_test::within_rounding(got, want, dtype);
    };
    // [gate | up] and [q | k | v] as one GEMM writes them: rows 2 x 24 and 2 x 32 elements apart.
    const auto gate_up = torch::randn({2, 3, 48}, device()).to(dtype).requires_grad_(true);  // [2, 3, 48]
    const auto gate = gate_up.narrow(-1, 0, 24), up = gate_up.narrow(-1, 24, 24);            // [2, 3, 24] each
    const auto gate_copy = gate.detach().contiguous().requires_grad_(true);  // [2, 3, 24]
    const auto up_copy = up.detach().contiguous().requires_grad_(true);      // [2, 3, 24]
    const auto out = titan::swiglu(gate, up), out_copy = titan::swiglu(gate_copy, up_copy);
    CHECK(same(out, out_copy));
    const auto g = torch::randn_like(out);
    out.backward(g);
    out_copy.backward(g);
    CHECK(same(gate_up.grad(), torch::cat({gate_copy.grad(), up_copy.grad()}, -1)));

    const auto qkv = torch::randn({2, 5, 64}, device()).to(dtype);                            // [2, 5, 64]: q 32, k 16, v 16
    const auto q = qkv.narrow(-1, 0, 32).view({2, 5, 4, 8}), k = qkv.narrow(-1, 32, 16).view({2, 5, 2, 8});
    const auto positions = torch::arange(5, torch::kDouble).unsqueeze(1) * torch::rand({1, 4}, torch::kDouble);  // [5, 4]
    const auto cos = positions.cos().to(torch::kFloat).to(device()), sin = positions.sin().to(torch::kFloat).to(device());
    const auto [qr, kr] = titan::rope(q, k, cos, sin);
    const auto [qr_copy, kr_copy] = titan::rope(q.contiguous(), k.contiguous(), cos, sin);
    CHECK(same(qr, qr_copy));
    CHECK(same(kr, kr_copy));
  }
}

TEST_CASE("fused linear: errors name what is wrong") {
  const auto x = torch::randn({2, 16}, device());
  CHECK(error_of([&] { titan::linear_fused(x, {}); }).find("titan::linear_fused: no weights given") != std::string::npos);
  CHECK(error_of([&] { titan::linear_fused(x, {torch::randn({4, 16}, device()), torch::randn({4, 8}, device())}); })
            .find("weight 1 must be [out, 16] for an input of shape [2, 16], got [4, 8]") != std::string::npos);
  CHECK(error_of([&] { titan::linear_fused(x, {torch::randn({4, 16}, device()).to(torch::kDouble)}); })
            .find("weight 0 is Double on") != std::string::npos);
}
