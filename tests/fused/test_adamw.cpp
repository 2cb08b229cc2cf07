// titan/fused/adamw.hpp: titan::adamw_copy_ against ATen's fused AdamW (at::_fused_adamw_, which
// torch.optim.AdamW(fused=True) runs) on the same gradients widened to fp32: parameters, moments
// and the gradients written back bitwise on the ATen path, within one fp32 rounding with titan's
// CUDA kernel (fused_testing.hpp); the copies equal the parameters rounded to their dtype; a
// skipped step changes nothing but still writes the copies; and the errors (a parameter dtype
// ATen's kernel does not take among them).
#include "fused_testing.hpp"

#include <ATen/ops/_fused_adamw.h>

#include <optional>
#include <string>
#include <vector>

namespace {

using titan_test::device;
using titan_test::same_values;
using torch::Tensor;

const auto kFloat32 = torch::TensorOptions().dtype(torch::kFloat);

/// One optimizer's tensors: fp32 parameters and moments, gradients in `grad_dtype`, copies in
/// `copy_dtype`, step counts; shapes that are not multiples of anything, one over a multi-tensor
/// chunk (65,536 elements), moments of earlier steps.
struct Tensors {
  std::vector<Tensor> params, grads, exp_avgs, exp_avg_sqs, copies, steps;

  Tensors(torch::Dtype grad_dtype, torch::Dtype copy_dtype) {
    torch::manual_seed(7);
    for (const auto& shape : std::vector<std::vector<int64_t>>{{7, 13}, {5}, {3, 4, 2}, {70001}}) {
      auto o = kFloat32.device(device());
      params.push_back(torch::randn(shape, o));
      grads.push_back((torch::randn(shape, o) * 0.1).to(grad_dtype));
      exp_avgs.push_back(torch::randn(shape, o) * 0.01);
      exp_avg_sqs.push_back(torch::rand(shape, o) * 1e-3);
      copies.push_back(torch::zeros(shape, o.dtype(copy_dtype)));
      steps.push_back(torch::full({}, 3.0, o));
    }
  }

  Tensors clone() const {
    Tensors c = *this;
    for (auto* list : {&c.params, &c.grads, &c.exp_avgs, &c.exp_avg_sqs, &c.copies, &c.steps})
      for (auto& t : *list) t = t.clone();
    return c;
  }
};

const auto kOptions = titan::AdamWCopyOptions().lr(1e-2).beta1(0.9).beta2(0.95).weight_decay(0.1).eps(1e-8);

/// ATen's fused AdamW on the gradients widened to fp32 (the reference), in place on `t`; returns the
/// widened gradients as the kernel left them (scaled when grad_scale is given).
std::vector<Tensor> aten_step(Tensors& t, const std::optional<Tensor>& grad_scale,
                              const std::optional<Tensor>& found_inf) {
  std::vector<Tensor> wide;
  for (const auto& g : t.grads) wide.push_back(g.to(torch::kFloat));
  at::_fused_adamw_(t.params, wide, t.exp_avgs, t.exp_avg_sqs, {}, t.steps, kOptions.lr(), kOptions.beta1(),
                    kOptions.beta2(), kOptions.weight_decay(), kOptions.eps(), /*amsgrad=*/false, /*maximize=*/false,
                    grad_scale, found_inf);
  return wide;
}

/// Bitwise on the ATen path, within one fp32 rounding where titan's CUDA kernel runs.
bool matches(const Tensor& got, const Tensor& want) {
  return titan_test::fused_kernels_run() ? titan_test::within_rounding(got, want, torch::kFloat)
                                         : same_values(got, want);
}

}  // namespace

TEST_CASE("adamw_copy_: ATen's fused AdamW on the widened gradients, and the copies are the parameters rounded") {
  for (auto grad_dtype : {torch::kBFloat16, torch::kFloat}) {
    for (auto copy_dtype : {torch::kBFloat16, torch::kHalf, torch::kFloat}) {
      for (bool scaled : {false, true}) {
        INFO(c10::toString(grad_dtype) << " gradients, " << c10::toString(copy_dtype) << " copies, scaled " << scaled);
        const Tensors start(grad_dtype, copy_dtype);
        auto want = start.clone(), got = start.clone();
        std::optional<Tensor> scale;
        if (scaled) scale = torch::full({1}, 1.7, kFloat32.device(device()));
        const auto wide = aten_step(want, scale, std::nullopt);
        titan::adamw_copy_(got.params, got.grads, got.exp_avgs, got.exp_avg_sqs, got.copies, got.steps, kOptions,
                           scale);
        for (size_t i = 0; i < start.params.size(); ++i) {
          CAPTURE(i);
          CHECK_FALSE(same_values(got.params[i], start.params[i]));  // it stepped
          CHECK(matches(got.params[i], want.params[i]));
          CHECK(matches(got.exp_avgs[i], want.exp_avgs[i]));
          CHECK(matches(got.exp_avg_sqs[i], want.exp_avg_sqs[i]));
          CHECK(same_values(got.copies[i], got.params[i].to(copy_dtype)));
          // Written back scaled (in their own dtype) only when a scale is given.
          CHECK((got.grads[i].scalar_type() == grad_dtype));
          const auto grad_want = scaled ? wide[i].to(grad_dtype) : start.grads[i];
          CHECK((scaled && titan_test::fused_kernels_run() ? titan_test::within_rounding(got.grads[i], grad_want, grad_dtype)
                                                             : same_values(got.grads[i], grad_want)));
        }
      }
    }
  }
}

TEST_CASE("adamw_copy_: a skipped step (found_inf) leaves everything but the copies, which it writes") {
  const Tensors start(torch::kBFloat16, torch::kBFloat16);
  auto got = start.clone();
  const auto found_inf = torch::ones({1}, kFloat32.device(device()));
  titan::adamw_copy_(got.params, got.grads, got.exp_avgs, got.exp_avg_sqs, got.copies, got.steps, kOptions,
                     torch::full({1}, 2.0, kFloat32.device(device())), found_inf);
  for (size_t i = 0; i < start.params.size(); ++i) {
    CAPTURE(i);
    CHECK(same_values(got.params[i], start.params[i]));
    CHECK(same_values(got.exp_avgs[i], start.exp_avgs[i]));
    CHECK(same_values(got.exp_avg_sqs[i], start.exp_avg_sqs[i]));
    CHECK(same_values(got.grads[i], start.grads[i]));
    CHECK(same_values(got.copies[i], start.params[i].to(torch::kBFloat16)));
  }
}

TEST_CASE("adamw_copy_: mismatched lists and step counts are errors naming what was expected") {
  const Tensors t(torch::kBFloat16, torch::kBFloat16);
  std::vector<Tensor> short_copies(t.copies.begin(), t.copies.end() - 1);
  CHECK_THROWS_WITH(titan::adamw_copy_(t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, short_copies, t.steps, kOptions),
                    doctest::Contains("one entry per parameter (4)"));
  auto wrong_moment = t.exp_avgs;
  wrong_moment[1] = wrong_moment[1].to(torch::kBFloat16);
  CHECK_THROWS_WITH(titan::adamw_copy_(t.params, t.grads, wrong_moment, t.exp_avg_sqs, t.copies, t.steps, kOptions),
                    doctest::Contains("expected the parameter's Float"));
  auto wrong_copy = t.copies;
  wrong_copy[0] = torch::zeros({13, 7}, wrong_copy[0].options());
  CHECK_THROWS_WITH(titan::adamw_copy_(t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, wrong_copy, t.steps, kOptions),
                    doctest::Contains("the parameter's shape [7, 13]"));
  // A parameter of a dtype ATen's fused AdamW does not step is its error, never a parameter left as it was.
  auto f8 = t.clone();
  for (auto* list : {&f8.params, &f8.exp_avgs, &f8.exp_avg_sqs}) (*list)[1] = (*list)[1].to(torch::kFloat8_e4m3fn);
  CHECK_THROWS(titan::adamw_copy_(f8.params, f8.grads, f8.exp_avgs, f8.exp_avg_sqs, f8.copies, f8.steps, kOptions));
  auto long_steps = t.steps;
  long_steps[2] = torch::full({}, 3, torch::TensorOptions().dtype(torch::kLong).device(device()));
  CHECK_THROWS_WITH(titan::adamw_copy_(t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.copies, long_steps, kOptions),
                    doctest::Contains("one-element float32 tensor"));
}
