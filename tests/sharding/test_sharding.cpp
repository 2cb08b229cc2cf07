// titan/sharding.hpp: clip_grad_norm_ (grad_norm, clip_coefficient) driven by parameter layouts equals PyTorch's
// torch::nn::utils::clip_grad_norm_ on the single-process model, under FSDP, TP and FSDP x TP
// (1, 2 and 4 ranks); memory_usage counts every optimizer titan knows. On titan_test::device().
#include "../support/tiny_gpt2.hpp"
#include "../support/tp_test_util.hpp"

#include <titan/fsdp.hpp>

namespace {

const titan::WorldPtr& world() { return titan_test::world(); }
using titan_test::device;

enum class Parallelism { Fsdp, Tp, FsdpTp };

/// The tiny GPT-2 parallelized over every rank as `how` says, with its mesh.
std::pair<gpt2_test::Gpt2, titan::DeviceMesh> parallel_gpt2(const gpt2_test::Gpt2Args& a, Parallelism how) {
  const int64_t n = world()->world_size();
  const int64_t tp = how == Parallelism::Fsdp ? 1 : how == Parallelism::Tp ? n : 2;
  titan::DeviceMesh mesh(world(), {"dp_shard", "tp"}, {n / tp, tp});
  auto model = gpt2_test::seeded_gpt2(a, device());
  if (tp > 1) titan::parallelize_module(model, mesh["tp"], gpt2_test::gpt2_plan(a, true, true));
  if (how != Parallelism::Tp) {
    for (const auto& block : *model->h) titan::fully_shard(block, mesh["dp_shard"]);
    titan::fully_shard(model, mesh["dp_shard"]);
  }
  return {model, mesh};
}

}  // namespace

TEST_CASE("clip_grad_norm_: replicated parameters are counted once, as torch::nn::utils::clip_grad_norm_") {
  for (double max_norm : {0.5, 100.0, 0.0}) {
    CAPTURE(max_norm);
    torch::manual_seed(3);
    torch::nn::Linear a(4, 3), b(4, 3);  // the same weights; the same gradients on every rank
    a->to(device());
    b->to(device());
    {
      torch::NoGradGuard no_grad;
      b->weight.copy_(a->weight);
      b->bias.copy_(a->bias);
    }
    auto x = torch::randn({5, 4}).to(device());
    (a->forward(x).pow(2).sum() * 3).backward();
    (b->forward(x).pow(2).sum() * 3).backward();
    const double expected = torch::nn::utils::clip_grad_norm_(b->parameters(), max_norm > 0 ? max_norm : 1e30);
    const double norm = titan::clip_grad_norm_(a, max_norm, world()->group()).item<double>();
    CHECK(norm == doctest::Approx(expected).epsilon(1e-6));  // LibTorch sums in float32, titan in float64
    CHECK_CLOSE(a->weight.grad(), b->weight.grad(), 1e-6);
    CHECK_CLOSE(a->bias.grad(), b->bias.grad(), 1e-6);
  }
}

TEST_CASE("clip_grad_norm_ under FSDP, TP and FSDP x TP gives the single-process norm and clipped gradients") {
  const gpt2_test::Gpt2Args a;
  const int64_t n = world()->world_size();
  auto [tokens, labels] = gpt2_test::lm_batch(a, 0, device());  // the global batch of 4 rows, the same on every rank
  const double valid = labels.ne(-100).sum().item<double>();
  auto reference = gpt2_test::seeded_gpt2(a, device());
  torch::cross_entropy_loss(reference->forward(tokens).flatten(0, 1), labels.flatten()).backward();
  const double max_norm = 0.25;  // below the norm: the gradients are scaled
  const double expected = torch::nn::utils::clip_grad_norm_(reference->parameters(), max_norm);
  REQUIRE(expected > max_norm);
  for (auto how : {Parallelism::Fsdp, Parallelism::Tp, Parallelism::FsdpTp}) {
    if (how == Parallelism::FsdpTp && n != 4) continue;
    CAPTURE(static_cast<int>(how));
    auto [model, mesh] = parallel_gpt2(a, how);
    const int64_t dp = mesh.size("dp_shard"), rows = 4 / dp, first = mesh.coordinate("dp_shard") * rows;
    auto logits = titan::call(model, tokens.narrow(0, first, rows));  // this dp rank's rows
    auto mine = labels.narrow(0, first, rows);
    auto loss = mesh.size("tp") > 1
                    ? titan::loss_parallel_cross_entropy(logits, mine, mesh.group("tp"), -100, at::Reduction::Sum)
                    : torch::cross_entropy_loss(logits.flatten(0, 1), mine.flatten(), {}, at::Reduction::Sum);
    (loss * (static_cast<double>(dp) / valid)).backward();  // FSDP averages over dp: the global mean
    const double norm = titan::clip_grad_norm_(model, max_norm, world()->group()).item<double>();
    CHECK(norm == doctest::Approx(expected).epsilon(1e-5));
    tp_test::check_gradients_match(*model, *reference, 1e-6);
  }
}

TEST_CASE("grad_norm measures what clip_grad_norm_ clips by; clip_coefficient is its factor") {
  torch::manual_seed(5);
  torch::nn::Linear linear(4, 3);
  linear->to(device());
  (linear->forward(torch::randn({5, 4}).to(device())).pow(2).sum() * 3).backward();
  const auto weight_grad = linear->weight.grad().clone(), bias_grad = linear->bias.grad().clone();
  const auto norm = titan::grad_norm(linear, world()->group());  // [] fp64
  CHECK((norm.scalar_type() == torch::kDouble));
  CHECK_CLOSE(linear->weight.grad(), weight_grad, 0.0);  // measuring leaves the gradients alone
  const double expected = std::sqrt(weight_grad.to(torch::kDouble).pow(2).sum().item<double>() +
                                    bias_grad.to(torch::kDouble).pow(2).sum().item<double>());
  CHECK(norm.item<double>() == doctest::Approx(expected).epsilon(1e-6));
  const double max_norm = norm.item<double>() / 4;
  const auto coefficient = titan::clip_coefficient(norm, max_norm);
  CHECK(coefficient.item<double>() == doctest::Approx(max_norm / (norm.item<double>() + 1e-6)).epsilon(1e-12));
  CHECK(titan::clip_coefficient(norm, 1e9).item<double>() == 1.0);  // capped at 1
  const auto inf = torch::full({}, INFINITY, torch::TensorOptions().dtype(torch::kDouble).device(norm.device()));
  CHECK(titan::clip_coefficient(inf, 1.0).item<double>() == 1.0);  // a non-finite norm leaves the gradients alone
  CHECK_THROWS_WITH(titan::clip_coefficient(norm, 0.0), doctest::Contains("max_norm must be positive, got 0"));
  titan::clip_grad_norm_(linear, max_norm, world()->group());
  CHECK_CLOSE(linear->weight.grad(), weight_grad * coefficient.item<double>(), 1e-7);
  CHECK_CLOSE(linear->bias.grad(), bias_grad * coefficient.item<double>(), 1e-7);
}

TEST_CASE("clip_grad_norm_ names a shard level outside the given group") {
  if (world()->world_size() == 1) return;
  titan::DeviceMesh mesh(world(), {"dp_shard", "tp"}, {world()->world_size(), 1});
  torch::nn::Linear linear(4, 8);
  linear->to(device());
  titan::fully_shard(linear, mesh["dp_shard"]);
  titan::call(linear, torch::randn({2, 4}, device())).sum().backward();
  CHECK_THROWS_WITH(titan::clip_grad_norm_(linear, 1.0, mesh.group("tp")),
                    doctest::Contains("parameter 'weight' is sharded over 'dp_shard', whose rank"));
}

TEST_CASE("memory_usage counts the state of every optimizer titan knows, sharded like the parameters") {
  torch::manual_seed(3);
  torch::nn::Linear linear(6, 10);
  linear->to(device());
  titan::fully_shard(linear, titan::DeviceMesh(world(), {"dp_shard"}, {world()->world_size()}));
  const auto params = linear->parameters();
  auto step = [&](torch::optim::Optimizer& optimizer) {
    optimizer.zero_grad();
    titan::call(linear, torch::randn({3, 6}).to(device())).pow(2).sum().backward();
    optimizer.step();
    return titan::memory_usage(linear, &optimizer).optimizer_state_bytes;
  };
  const int64_t local = titan::memory_usage(linear).param_bytes;  // this rank's shards
  torch::optim::AdamW adamw(params, torch::optim::AdamWOptions(1e-3));
  torch::optim::Adam adam_amsgrad(params, torch::optim::AdamOptions(1e-3).amsgrad(true));
  torch::optim::SGD sgd(params, torch::optim::SGDOptions(1e-3).momentum(0.9));
  torch::optim::Adagrad adagrad(params, torch::optim::AdagradOptions(1e-3));
  torch::optim::RMSprop rmsprop(params, torch::optim::RMSpropOptions(1e-3).momentum(0.9).centered(true));
  CHECK(step(adamw) == 2 * local);
  CHECK(step(adam_amsgrad) == 3 * local);
  CHECK(step(sgd) == local);
  CHECK(step(adagrad) == local);
  CHECK(step(rmsprop) == 3 * local);
}
