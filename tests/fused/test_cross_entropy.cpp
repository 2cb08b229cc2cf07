// titan/fused/cross_entropy.hpp: titan::cross_entropy against at::cross_entropy on fp32 copies of
// the logits (PyTorch's unfused loss, as the trainer computed it before): loss and gradient in
// fp32, fp64 and bf16, over several row chunks, with ignored targets, through the dispatcher, and
// the errors. In a build with titan::cuda_kernels, the cases on CUDA (TITAN_TEST_DEVICE=cuda, the
// GPU kit) run titan's CUDA kernel (fused_testing.hpp).
#include "fused_testing.hpp"

#include "../support/op_events.hpp"

#include <titan/ac.hpp>

#include <cmath>
#include <limits>
#include <string>

namespace {

using titan::CrossEntropyOptions;
using titan_test::device;
using titan_test::error_of;
using torch::Tensor;

/// Logits [2, 7, V] of `dtype` on device() with a wide spread of values, and targets [2, 7] with
/// a few ignored (-100).
struct Batch {
  Tensor logits, targets;
};
Batch make_batch(torch::Dtype dtype, int64_t vocab = 37) {
  titan_test::fused_kernels_registered();
  torch::manual_seed(5);
  auto logits = (4 * torch::randn({2, 7, vocab}, torch::kDouble)).to(dtype).to(device());  // [2, 7, V]
  auto targets = torch::randint(vocab, {2, 7}, torch::kLong);                              // [2, 7]
  targets[0][3] = -100;
  targets[1][0] = -100;
  targets[1][6] = -100;
  return {logits, targets.to(device())};
}

/// PyTorch's loss (and gradient of `scale` * loss w.r.t. logits, in the logits' dtype) on an
/// fp32 (fp64 for fp64) copy of the logits.
std::pair<Tensor, Tensor> reference(const Tensor& logits, const Tensor& targets, at::Reduction::Reduction reduction,
                                    double scale) {
  auto leaf = logits.detach().requires_grad_(true);
  const auto compute = logits.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto loss = torch::nn::functional::cross_entropy(
      leaf.to(compute).flatten(0, 1), targets.flatten(),
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(
          reduction == at::Reduction::Sum ? torch::nn::functional::CrossEntropyFuncOptions::reduction_t(torch::kSum)
                                          : torch::kMean));
  (loss * scale).backward();
  return {loss.detach(), leaf.grad()};
}

/// titan::cross_entropy's loss and gradient of `scale` * loss.
std::pair<Tensor, Tensor> fused(const Tensor& logits, const Tensor& targets, const CrossEntropyOptions& options,
                                double scale) {
  auto leaf = logits.detach().requires_grad_(true);
  auto loss = titan::cross_entropy(leaf, targets, options);
  (loss * scale).backward();
  return {loss.detach(), leaf.grad()};
}

}  // namespace

TEST_CASE("fused cross entropy: loss and gradient equal PyTorch's in fp32 and fp64, in one chunk or several") {
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    const auto batch = make_batch(dtype);
    const double tol = dtype == torch::kFloat ? 2e-5 : 1e-12;
    for (auto reduction : {at::Reduction::Sum, at::Reduction::Mean}) {
      // 14 rows: one chunk, chunks of 4 rows (the last of 2), and a chunk per row.
      for (int64_t rows_per_chunk : {100, 4, 1}) {
        CAPTURE(dtype);
        CAPTURE(static_cast<int>(reduction));
        CAPTURE(rows_per_chunk);
        auto [want_loss, want_grad] = reference(batch.logits, batch.targets, reduction, 0.37);
        auto [loss, grad] = fused(batch.logits, batch.targets,
                                  CrossEntropyOptions().reduction(reduction).chunk_elements(rows_per_chunk * 37), 0.37);
        CHECK((loss.scalar_type() == want_loss.scalar_type()));
        CHECK((grad.scalar_type() == dtype));
        CHECK_CLOSE(loss, want_loss, tol * want_loss.abs().item<double>());
        CHECK_CLOSE(grad, want_grad, tol);
        CHECK(grad[0][3].abs().max().item<double>() == 0.0);  // an ignored row has no gradient
      }
    }
  }
}

TEST_CASE("fused cross entropy: bf16 logits give the fp32 loss and the fp32 gradient rounded to bf16") {
  const auto batch = make_batch(torch::kBFloat16, 1000);
  auto [want_loss, want_grad] = reference(batch.logits, batch.targets, at::Reduction::Sum, 1.0 / 11);
  auto [loss, grad] = fused(batch.logits, batch.targets,
                            CrossEntropyOptions().reduction(at::Reduction::Sum).chunk_elements(3000), 1.0 / 11);
  CHECK((loss.scalar_type() == torch::kFloat));
  CHECK((grad.scalar_type() == torch::kBFloat16));
  CHECK_CLOSE(loss, want_loss, 1e-5 * want_loss.abs().item<double>());
  // Rounded to bf16 before the scale and after it: within 2^-7 of PyTorch's (rounded once).
  const auto error = (grad.to(torch::kDouble) - want_grad.to(torch::kDouble)).abs();        // [2, 7, V]
  const auto bound = want_grad.to(torch::kDouble).abs() * std::ldexp(1.0, -7) + 1e-30;     // [2, 7, V]
  CHECK(error.le(bound).all().item<bool>());
  CHECK(grad.to(torch::kFloat).sum(-1).abs().max().item<double>() < 1e-3);  // each row's gradient sums to 0
}

TEST_CASE("fused cross entropy: grad_scale writes the scaled gradient in the forward; the backward rescales only "
          "when the incoming gradient differs") {
  const double scale = 0.37;
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    CAPTURE(dtype);
    const auto batch = make_batch(dtype, 300);
    const auto options = CrossEntropyOptions().reduction(at::Reduction::Sum).chunk_elements(4 * 300);
    auto [want_loss, want_grad] = reference(batch.logits, batch.targets, at::Reduction::Sum, scale);
    auto [plain_loss, plain_grad] = fused(batch.logits, batch.targets, options, scale);  // scaled by the backward
    std::vector<std::string> backward_ops;
    auto leaf = batch.logits.detach().requires_grad_(true);
    auto loss = titan::cross_entropy(leaf, batch.targets, CrossEntropyOptions(options).grad_scale(scale));
    {
      titan_test::OpEvents events;
      (loss * scale).backward();
      for (const auto& e : events.events())
        if (e.name == "aten::mul_") backward_ops.push_back(e.name);
    }
    CHECK(titan_test::same_values(loss, plain_loss));  // the value does not depend on grad_scale
    if (device().is_cpu()) CHECK(backward_ops.empty());  // the incoming gradient is grad_scale: no pass over dx
    // |got - want| <= |want| * relative, elementwise
    auto within = [](const Tensor& got, const Tensor& want, double relative) {
      const auto error = (got.to(torch::kDouble) - want.to(torch::kDouble)).abs();  // [2, 7, V]
      return error.le(want.to(torch::kDouble).abs() * relative + 1e-30).all().item<bool>();
    };
    if (dtype == torch::kFloat) {
      CHECK(titan_test::same_values(leaf.grad(), plain_grad));  // fp32: dx * fl32(scale) either way
    } else {
      // Rounded to bf16 once (not before and after the scale): within one bf16 ulp of PyTorch's
      // (itself rounded once), and closer overall than rounding twice.
      CHECK(within(leaf.grad(), want_grad, std::ldexp(1.0, -7)));
      const auto once = (leaf.grad().to(torch::kDouble) - want_grad.to(torch::kDouble)).abs().sum().item<double>();
      const auto twice = (plain_grad.to(torch::kDouble) - want_grad.to(torch::kDouble)).abs().sum().item<double>();
      CHECK(once <= twice);
    }
    // Another incoming gradient (the loss scaled by 2 instead): rescaled by 2 / scale, still right.
    auto [want2_loss, want2_grad] = reference(batch.logits, batch.targets, at::Reduction::Sum, 2.0);
    auto [loss2, grad2] = fused(batch.logits, batch.targets, CrossEntropyOptions(options).grad_scale(scale), 2.0);
    CHECK(within(grad2, want2_grad, dtype == torch::kFloat ? 1e-5 : std::ldexp(1.0, -6)));
  }
  const auto batch = make_batch(torch::kFloat);
  for (double bad : {0.0, std::numeric_limits<double>::infinity()})
    CHECK(error_of([&] { titan::cross_entropy(batch.logits, batch.targets, CrossEntropyOptions().grad_scale(bad)); })
              .find("grad_scale must be finite and nonzero") != std::string::npos);
}

TEST_CASE("fused cross entropy: without gradients the loss alone, the same value") {
  const auto batch = make_batch(torch::kFloat);
  const auto options = CrossEntropyOptions().chunk_elements(5 * 37);
  auto [with_grad, grad] = fused(batch.logits, batch.targets, options, 1.0);
  Tensor loss;
  {
    torch::NoGradGuard no_grad;
    loss = titan::cross_entropy(batch.logits.detach().requires_grad_(true), batch.targets, options);
  }
  CHECK(!loss.requires_grad());
  CHECK(titan_test::same_values(loss, with_grad));
  CHECK(titan_test::same_values(titan::cross_entropy(batch.logits, batch.targets, options), with_grad));
}

TEST_CASE("fused cross entropy: every target ignored gives sum 0, mean NaN and no gradient") {
  auto batch = make_batch(torch::kFloat);
  batch.targets.fill_(-7);
  const auto options = CrossEntropyOptions().ignore_index(-7);
  auto [sum, grad] = fused(batch.logits, batch.targets, CrossEntropyOptions(options).reduction(at::Reduction::Sum), 1.0);
  CHECK(sum.item<double>() == 0.0);
  CHECK(grad.abs().max().item<double>() == 0.0);
  CHECK(std::isnan(titan::cross_entropy(batch.logits, batch.targets, options).item<double>()));
}

TEST_CASE("fused cross entropy: dispatcher operators that activation checkpointing can name") {
  titan::register_cross_entropy_operators();
  CHECK(c10::Dispatcher::singleton().findSchema({"titan::cross_entropy", ""}).has_value());
  CHECK(c10::Dispatcher::singleton().findSchema({"titan::cross_entropy_loss_and_grad", ""}).has_value());
  const auto rescale = c10::Dispatcher::singleton().findSchema({"titan::cross_entropy_rescale_grad_", ""});
  REQUIRE(rescale.has_value());
  CHECK(rescale->hasKernelForDispatchKey(c10::DispatchKey::CUDA) == titan_test::fused_kernels_registered());
  const auto loss_and_grad = c10::Dispatcher::singleton().findSchema({"titan::cross_entropy_loss_and_grad", ""});
  CHECK(loss_and_grad->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd));
  CHECK(loss_and_grad->hasKernelForDispatchKey(c10::DispatchKey::CUDA) == titan_test::fused_kernels_registered());
  titan::OpSavePolicy policy({"titan::cross_entropy_loss_and_grad"}, {});
  CHECK(policy.ops() == std::vector<std::string>{"titan::cross_entropy_loss_and_grad"});
  // An int32 target tensor is accepted (as at::cross_entropy's int64); the result is the same.
  const auto batch = make_batch(torch::kFloat);
  auto targets32 = batch.targets.to(torch::kInt);
  CHECK(titan_test::same_values(titan::cross_entropy(batch.logits, targets32), titan::cross_entropy(batch.logits, batch.targets)));
}

TEST_CASE("fused cross entropy: errors name what is wrong") {
  const auto batch = make_batch(torch::kFloat);
  CHECK(error_of([&] { titan::cross_entropy(batch.logits, batch.targets.flatten()); })
            .find("needs logits [..., V] and targets [...] with the same leading sizes, got [2, 7, 37] and [14]") !=
        std::string::npos);
  CHECK(error_of([&] { titan::cross_entropy(batch.logits, batch.targets.to(torch::kFloat)); })
            .find("targets must be class indices (an integer dtype), got Float") != std::string::npos);
  CHECK(error_of([&] {
          titan::cross_entropy(batch.logits, batch.targets, CrossEntropyOptions().reduction(at::Reduction::None));
        }).find("reduction must be Sum or Mean") != std::string::npos);
  CHECK(error_of([&] { titan::cross_entropy(batch.logits, batch.targets, CrossEntropyOptions().chunk_elements(0)); })
            .find("chunk_elements must be positive, got 0") != std::string::npos);
  CHECK(error_of([&] { titan::cross_entropy(batch.logits.to(torch::kLong), batch.targets); })
            .find("logits must be floating point, got Long") != std::string::npos);
  if (device().is_cpu()) {  // on CUDA an out-of-range target is a device-side assert, as in at::cross_entropy
    auto targets = batch.targets.clone();
    targets[1][2] = 37;
    CHECK(error_of([&] { titan::cross_entropy(batch.logits, targets); })
              .find("target 37 of row 9 is outside the vocabulary [0, 37) and is not ignore_index (-100)") !=
          std::string::npos);
  }
  auto leaf = batch.logits.detach().requires_grad_(true);
  auto loss = titan::cross_entropy(leaf, batch.targets);
  loss.backward({}, /*retain_graph=*/true);
  CHECK(error_of([&] { loss.backward(); }).find("the backward ran twice (retain_graph)") != std::string::npos);
}
