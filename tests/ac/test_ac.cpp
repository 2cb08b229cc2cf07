// titan/ac.hpp: checkpointed runs give the no-checkpoint losses and gradients, and keep less. The
// models, inputs and random streams are titan_test::device()'s.
#include "../support/multirank.hpp"
#include "../support/op_events.hpp"
#include "ac_testing.hpp"

#include <titan/ac.hpp>
#include <titan/fsdp.hpp>

#include <string>
#include <vector>

namespace {

using titan_ac::BlockOptions;
using titan_ac::Stack;
using titan_test::device;

/// What a training step produced, to compare runs.
struct Step {
  torch::Tensor loss;
  std::vector<torch::Tensor> grads;  // of the parameters, in order
  torch::Tensor input_grad;
  torch::Tensor next_random;  // first draw after the step: the caller's RNG stream (device()'s)
};

/// A stack with the weights of seed 7 (drawn on the CPU), on device().
Stack make_stack(int64_t layers, const BlockOptions& o) {
  torch::manual_seed(7);
  Stack stack(layers, o);
  stack->to(device());
  return stack;
}

/// An input of seed 11 (drawn on the CPU), on device().
torch::Tensor make_input(int64_t batch, int64_t seq, int64_t dim, bool requires_grad = true) {
  torch::manual_seed(11);
  return torch::randn({batch, seq, dim}).to(device()).requires_grad_(requires_grad);
}

Step run_step(Stack& model, const torch::Tensor& x) {
  model->zero_grad();
  if (x.requires_grad()) x.mutable_grad() = torch::Tensor();
  torch::manual_seed(1234);
  Step step;
  step.loss = model->forward(x).pow(2).mean();
  step.loss.backward();
  for (const auto& p : model->parameters()) step.grads.push_back(p.grad().defined() ? p.grad().clone() : p.grad());
  if (x.requires_grad()) step.input_grad = x.grad().clone();
  step.next_random = torch::rand({4}, device());
  return step;
}

double max_grad_diff(const Step& a, const Step& b) {
  REQUIRE(a.grads.size() == b.grads.size());
  double worst = 0;
  for (size_t i = 0; i < a.grads.size(); ++i) {
    REQUIRE_MESSAGE(a.grads[i].defined(), "parameter ", i, " has no gradient");
    REQUIRE_MESSAGE(b.grads[i].defined(), "parameter ", i, " has no gradient");
    worst = std::max(worst, titan_test::max_abs_diff(a.grads[i], b.grads[i]));
  }
  if (a.input_grad.defined() || b.input_grad.defined())
    worst = std::max(worst, titan_test::max_abs_diff(a.input_grad, b.input_grad));
  return worst;
}

void check_same_step(const Step& reference, const Step& checkpointed) {
  CHECK_CLOSE(reference.loss, checkpointed.loss, 0.0);
  const double diff = max_grad_diff(reference, checkpointed);
  MESSAGE("max gradient difference to the run without checkpointing: ", diff);
  CHECK(diff <= 1e-6);
  CHECK_CLOSE(reference.next_random, checkpointed.next_random, 0.0);
}

titan::ActivationCheckpointOptions ac(titan::AcMode mode, int64_t every_k = 2) {
  return titan::ActivationCheckpointOptions().mode(mode).every_k(every_k);
}

/// A hook counting its calls, to see where in the nesting the recomputation starts.
struct CountingHook : titan::ModuleHook {
  std::string name() const override { return "count"; }
  at::Tensor forward(torch::nn::Module&, const titan::TensorList& inputs, const titan::ForwardFn& next) override {
    ++calls;
    return next(inputs);
  }
  int calls = 0;
};

/// y = linear(x) * scale, where `scale` is a tensor the forward closes over (not an input).
struct ScaledLinearImpl : torch::nn::Module {
  ScaledLinearImpl() : linear(register_module("linear", torch::nn::Linear(6, 6))) {}
  torch::Tensor forward(const torch::Tensor& x) { return torch::tanh(linear(x)) * scale; }
  torch::nn::Linear linear;
  torch::Tensor scale;
};
TORCH_MODULE(ScaledLinear);

/// Draws random numbers inside a policy operator (aten::bernoulli) and after it (dropout).
struct RandomOpsImpl : torch::nn::Module {
  RandomOpsImpl() : linear(register_module("linear", torch::nn::Linear(8, 8))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = linear(x);
    auto mask = torch::bernoulli(torch::full_like(h, 0.7));
    return torch::dropout(torch::sin(h) * mask, 0.3, true);
  }
  torch::nn::Linear linear;
};
TORCH_MODULE(RandomOps);

/// Two matrix products through `_unsafe_view`, whose result does not share mm's version counter:
/// a saved mm output kept as an alias sees a write into the view (as matmul + bias writes the bias).
struct WrittenProductImpl : torch::nn::Module {
  WrittenProductImpl() : w(register_parameter("w", torch::randn({6, 6}) / 3)) {}
  torch::Tensor forward(const torch::Tensor& x) {                    // x: [4, 6]
    auto y = at::_unsafe_view(torch::mm(x, w), {2, 2, 6});             // [2, 2, 6]
    if (write_inside) y.add_(1.0);
    auto z = at::_unsafe_view(torch::mm(torch::tanh(y).view({4, 6}), w), {2, 2, 6});  // [2, 2, 6]
    return return_product ? z : torch::tanh(z);                        // z: the caller may write into it
  }
  torch::Tensor w;
  bool write_inside = false;
  bool return_product = false;
};
TORCH_MODULE(WrittenProduct);

/// addmm whose alpha depends on grad mode: the checkpointed first forward (no-grad) and the
/// recomputation call it with different non-tensor arguments, as SDPA's compute_log_sumexp does.
struct GradModeScaledImpl : torch::nn::Module {
  GradModeScaledImpl() : w(register_parameter("w", torch::randn({6, 6}) / 3)), b(register_parameter("b", torch::randn({6}))) {}
  torch::Tensor forward(const torch::Tensor& x) {  // x: [4, 6]
    const double alpha = torch::autograd::GradMode::is_enabled() ? 1.0 : 2.0;
    return torch::tanh(at::addmm(b, x, w, /*beta=*/1.0, alpha));  // [4, 6]
  }
  torch::Tensor w, b;
};
TORCH_MODULE(GradModeScaled);

}  // namespace

TEST_CASE("per-operator checkpointing replays a saved output only for the same non-tensor arguments") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  // The recomputation calls addmm with alpha 1 where the first forward used 2: replaying the saved
  // output would give tanh' of the wrong product; the operator is recomputed and the gradients are
  // those of the run without checkpointing.
  auto run = [](bool checkpoint) {
    torch::manual_seed(3);
    GradModeScaled model;
    model->to(device());
    if (checkpoint)
      titan::checkpoint_wrapper(model, titan::CheckpointWrapperOptions().policy(std::make_shared<titan::OpSavePolicy>(
                                           std::vector<std::string>{"aten::addmm"}, std::vector<std::string>{})));
    auto input = torch::randn({4, 6}).to(device()).requires_grad_(true);
    titan::call(model, input).sum().backward();
    return std::make_pair(model->w.grad(), input.grad());
  };
  const auto [w_plain, x_plain] = run(false);
  const auto [w_ac, x_ac] = run(true);
  CHECK_CLOSE(w_ac, w_plain, 1e-6);
  CHECK_CLOSE(x_ac, x_plain, 1e-6);
}

TEST_CASE("per-operator checkpointing keeps saved outputs without copying, and copies one before a write") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  // WrittenProduct saves two mm outputs. Without writes none is copied; a write into the first
  // inside the region copies it (1), a write by the caller into the region's output also the
  // second (2). Gradients stay those of the run without checkpointing.
  for (int writes : {0, 1, 2}) {
    CAPTURE(writes);
    auto run = [&](bool checkpoint, int& clones) {
      torch::manual_seed(5);
      WrittenProduct model;
      model->to(device());
      model->write_inside = writes >= 1;
      model->return_product = writes == 2;
      if (checkpoint)
        titan::checkpoint_wrapper(model, titan::CheckpointWrapperOptions().policy(
                                             std::make_shared<titan::OpSavePolicy>(std::vector<std::string>{"aten::mm"},
                                                                                   std::vector<std::string>{})));
      auto input = torch::randn({4, 6}).to(device()).requires_grad_(true);
      titan_test::OpEvents observer;
      auto out = titan::call(model, input);
      for (const auto& e : observer.events()) clones += e.name == "aten::clone";
      if (writes == 2) out.mul_(2.0);
      out.pow(2).sum().backward();
      return std::make_pair(model->w.grad(), input.grad());
    };
    int plain_clones = 0, checkpointed_clones = 0;
    const auto [w_plain, x_plain] = run(false, plain_clones);
    const auto [w_ac, x_ac] = run(true, checkpointed_clones);
    CHECK(plain_clones == 0);
    CHECK(checkpointed_clones == writes);
    CHECK_CLOSE(w_ac, w_plain, 1e-6);
    CHECK_CLOSE(x_ac, x_plain, 1e-6);
  }
}

TEST_CASE("activation checkpointing: every mode gives the losses and gradients of the run without it") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  const auto o = BlockOptions().dim(32).heads(4).hidden(64);
  const auto x = make_input(2, 16, 32);
  auto reference_model = make_stack(4, o);
  const Step reference = run_step(reference_model, x);
  using titan::AcMode;
  for (const auto& [options, expected] : std::vector<std::pair<titan::ActivationCheckpointOptions, size_t>>{
           {ac(AcMode::Full), 4}, {ac(AcMode::EveryKthLayer, 1), 4}, {ac(AcMode::EveryKthLayer, 2), 2},
           {ac(AcMode::EveryKthLayer, 3), 1}, {ac(AcMode::PerOperator), 4},
           // Every other matrix product kept, the others recomputed and matched by call index.
           {ac(AcMode::PerOperator).every_other_ops({"aten::mm", "aten::addmm"}), 4},
           {ac(AcMode::PerOperator).every_other_ops({}), 4}}) {
    CAPTURE(static_cast<int>(options.mode()));
    CAPTURE(options.every_k());
    CAPTURE(options.every_other_ops().size());
    auto model = make_stack(4, o);
    const size_t wrapped = titan::apply_activation_checkpointing(model->layers, options);
    CHECK(wrapped == expected);
    check_same_step(reference, run_step(model, x));
    // A second step through the same hooks is the same again (nothing left over from the first).
    check_same_step(reference, run_step(model, x));
  }
}

TEST_CASE("activation checkpointing: dropout recomputes identically (RNG restored), and differs without") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  const auto o = BlockOptions().dim(32).heads(4).hidden(64).dropout(0.2);
  const auto x = make_input(2, 16, 32);
  auto reference_model = make_stack(3, o);
  const Step reference = run_step(reference_model, x);
  for (const auto& options :
       {ac(titan::AcMode::Full), ac(titan::AcMode::PerOperator), ac(titan::AcMode::EveryKthLayer, 2)}) {
    CAPTURE(static_cast<int>(options.mode()));
    auto model = make_stack(3, o);
    titan::apply_activation_checkpointing(model->layers, options);
    check_same_step(reference, run_step(model, x));
  }
  // The check above can fail: without restoring the generator, the masks of the recomputation differ.
  auto unrestored = make_stack(3, o);
  titan::apply_activation_checkpointing(unrestored->layers, ac(titan::AcMode::Full).preserve_rng_state(false));
  const Step step = run_step(unrestored, x);
  CHECK_CLOSE(reference.loss, step.loss, 0.0);
  CHECK(max_grad_diff(reference, step) > 1e-3);
}

TEST_CASE("selective per-operator checkpointing replays random policy operators and keeps the RNG stream") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  auto make = [] {
    torch::manual_seed(3);
    RandomOps m;
    m->to(device());
    return m;
  };
  const auto x = make_input(4, 3, 8);
  auto plain = make();
  titan::CheckpointWrapperOptions options;
  options.policy(std::make_shared<titan::OpSavePolicy>(std::vector<std::string>{"aten::addmm", "aten::bernoulli"}));
  auto checkpointed = make();
  titan::checkpoint_wrapper(checkpointed, options);
  auto step = [&x](RandomOps& m) {
    m->zero_grad();
    x.mutable_grad() = torch::Tensor();
    torch::manual_seed(99);
    auto loss = titan::call(m, x).sum();
    loss.backward();
    return std::make_tuple(loss.detach(), m->linear->weight.grad().clone(), x.grad().clone(), torch::rand({3}, device()));
  };
  auto [loss_a, grad_a, input_a, next_a] = step(plain);
  auto [loss_b, grad_b, input_b, next_b] = step(checkpointed);
  CHECK_CLOSE(loss_a, loss_b, 0.0);
  CHECK_CLOSE(grad_a, grad_b, 1e-6);
  CHECK_CLOSE(input_a, input_b, 1e-6);
  CHECK_CLOSE(next_a, next_b, 0.0);
}

TEST_CASE("checkpoint_wrapper: parameters and closed-over tensors get gradients, also when no input requires grad") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  auto make = [] {
    torch::manual_seed(5);
    ScaledLinear m;
    m->to(device());
    return m;
  };
  for (bool input_grad : {true, false}) {
    CAPTURE(input_grad);
    auto run = [&](bool checkpoint) {
      auto m = make();
      if (checkpoint) titan::checkpoint_wrapper(m);
      auto base = torch::linspace(0.5, 1.5, 6, device()).requires_grad_(true);
      m->scale = base * 2;  // a non-leaf tensor the forward closes over
      auto x = make_input(3, 2, 6, input_grad);
      auto loss = titan::call(m, x).pow(2).sum();
      loss.backward();
      return std::make_tuple(loss.detach(), m->linear->weight.grad(), m->linear->bias.grad(), base.grad(),
                             input_grad ? x.grad() : torch::zeros({1}, device()));
    };
    auto [loss_a, w_a, b_a, s_a, x_a] = run(false);
    auto [loss_b, w_b, b_b, s_b, x_b] = run(true);
    CHECK_CLOSE(loss_a, loss_b, 0.0);
    REQUIRE(w_b.defined());
    REQUIRE(s_b.defined());
    CHECK_CLOSE(w_a, w_b, 1e-6);
    CHECK_CLOSE(b_a, b_b, 1e-6);
    CHECK_CLOSE(s_a, s_b, 1e-6);
    CHECK_CLOSE(x_a, x_b, 1e-6);
  }
}

TEST_CASE("checkpoint_wrapper recomputes through the inner hooks, once, and not the outer ones") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  torch::manual_seed(5);
  ScaledLinear m;
  m->to(device());
  m->scale = torch::ones({6}, device());
  auto inner = std::make_shared<CountingHook>();
  auto outer = std::make_shared<CountingHook>();
  titan::attach_hook(*m, inner);
  titan::checkpoint_wrapper(m);
  titan::attach_hook(*m, outer);
  auto x = make_input(2, 2, 6);
  auto out = titan::call(m, x);
  CHECK(inner->calls == 1);
  CHECK(outer->calls == 1);
  CHECK_FALSE(m->linear->weight.grad().defined());
  out.sum().backward();
  CHECK(inner->calls == 2);  // the recomputation ran `next`: inner hook + forward
  CHECK(outer->calls == 1);
  CHECK(m->linear->weight.grad().defined());
  // Under no-grad nothing is checkpointed or recomputed.
  {
    torch::NoGradGuard no_grad;
    titan::call(m, x);
  }
  CHECK(inner->calls == 3);
  CHECK_THROWS_WITH_AS(titan::checkpoint_wrapper(m), doctest::Contains("already checkpointed"), c10::Error);
}

TEST_CASE("checkpoint_wrapper: a checkpointed module called with ->forward is an error naming it") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  // The stack calls its layers through titan::call; a parent calling one directly skips its hook
  // (nothing would be checkpointed), which titan::call reports when the parent's call returns.
  struct BypassImpl : torch::nn::Module {
    BypassImpl() {
      inner = register_module("inner", ScaledLinear());
      inner->to(device());
      inner->scale = torch::ones({6}, device());
    }
    torch::Tensor forward(const torch::Tensor& x) { return inner->forward(x); }
    ScaledLinear inner{nullptr};
  };
  auto parent = std::make_shared<BypassImpl>();
  titan::checkpoint_wrapper(parent->inner);
  CHECK_THROWS_WITH_AS(titan::call(parent, make_input(2, 2, 6)),
                       doctest::Contains("'inner' has checkpoint_wrapper attached but was not called through titan::call"),
                       c10::Error);
}

TEST_CASE("checkpoint_wrapper rejects an input modified in place after forward") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  torch::manual_seed(5);
  ScaledLinear m;
  m->to(device());
  m->scale = torch::ones({6}, device());
  titan::checkpoint_wrapper(m);
  auto leaf = make_input(2, 2, 6);
  auto x = leaf * 1.0;
  auto out = titan::call(m, x);
  {
    torch::NoGradGuard no_grad;
    x.add_(1.0);
  }
  CHECK_THROWS_WITH_AS(out.sum().backward(), doctest::Contains("modified in place"), c10::Error);
}

// Measured by the CPU's counting allocator, or by the GPU's caching allocator (titan_ac::measure_step).
TEST_CASE("activation checkpointing keeps less: full < selective < none") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  const auto o = BlockOptions().dim(64).heads(4).hidden(256);
  const auto x = make_input(4, 64, 64);
  auto saved = [&](const titan::ActivationCheckpointOptions& options) {
    auto model = make_stack(4, o);
    titan::apply_activation_checkpointing(model->layers, options);
    return titan_ac::measure_step(model, x);
  };
  const auto none = saved(ac(titan::AcMode::None)), full = saved(ac(titan::AcMode::Full)),
             every2 = saved(ac(titan::AcMode::EveryKthLayer, 2)), op = saved(ac(titan::AcMode::PerOperator));
  MESSAGE("saved bytes: none ", none.saved, ", full ", full.saved, ", selective 2 ", every2.saved, ", selective op ",
          op.saved);
  MESSAGE("peak bytes: none ", none.peak, ", full ", full.peak, ", selective 2 ", every2.peak, ", selective op ",
          op.peak);
  CHECK(full.saved * 4 < none.saved);
  CHECK(full.saved < every2.saved);
  CHECK(every2.saved < none.saved);
  CHECK(full.saved < op.saved);
  CHECK(op.saved < none.saved);
  CHECK(full.peak < none.peak);
  CHECK(op.peak < none.peak);
  // Deterministic: the same step measures the same again.
  CHECK(saved(ac(titan::AcMode::PerOperator)).saved == op.saved);
  // Keeping every other matrix product (torchtitan's policy, here on the blocks' addmm) keeps less
  // than keeping them all, and more than full checkpointing.
  const auto all = saved(ac(titan::AcMode::PerOperator).every_other_ops({}));
  const auto half = saved(ac(titan::AcMode::PerOperator).every_other_ops({"aten::mm", "aten::addmm"}));
  MESSAGE("selective op saved bytes: every matmul ", all.saved, ", every other ", half.saved);
  CHECK(half.saved < all.saved);
  CHECK(full.saved < half.saved);
}

TEST_CASE("activation checkpointing options and policies reject bad values, naming them") {
  if (titan_test::world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  auto model = make_stack(2, BlockOptions());
  for (int64_t bad : {0, -1}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(titan::apply_activation_checkpointing(model->layers, ac(titan::AcMode::EveryKthLayer, bad)),
                         doctest::Contains("every_k must be >= 1"), c10::Error);
  }
  CHECK(titan::hooks_of(*model->layers[0]).empty());
  CHECK_THROWS_WITH_AS(titan::OpSavePolicy({"aten::mmm"}), doctest::Contains("unknown operator 'aten::mmm'"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(titan::OpSavePolicy({"aten::linear"}), doctest::Contains("CompositeImplicitAutograd"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(titan::OpSavePolicy({"aten::mm.out"}), doctest::Contains("mutates or aliases"), c10::Error);
  titan::OpSavePolicy policy({"aten::mm", "aten::max.dim"});
  auto op = [](const char* name, const char* overload) {
    return *c10::Dispatcher::singleton().findSchema({name, overload});
  };
  CHECK(policy.saves(op("aten::mm", "")));
  CHECK(policy.saves(op("aten::mm", "dtype")));
  CHECK_FALSE(policy.saves(op("aten::mm", "out")));
  CHECK(policy.saves(op("aten::max", "dim")));
  CHECK_FALSE(policy.saves(op("aten::max", "")));
  CHECK_FALSE(policy.saves(op("aten::addmm", "")));
  CHECK(titan::OpSavePolicy().ops() == titan::OpSavePolicy::default_ops());
  // ".default" names the overload without a name; the default list keeps float8's amaxes.
  titan::OpSavePolicy unnamed({"aten::max.default"});
  CHECK(unnamed.saves(op("aten::max", "")));
  CHECK_FALSE(unnamed.saves(op("aten::max", "dim")));
  const titan::OpSavePolicy defaults;
  CHECK(defaults.saves(op("aten::max", "")));
  CHECK_FALSE(defaults.saves(op("aten::max", "other")));  // elementwise: not a scale's amax
  CHECK(defaults.saves(op("aten::linalg_vector_norm", "")));
}

TEST_CASE("activation checkpointing under FSDP: same losses and sharded gradients, no extra all-gather") {
  // AC first, then fully_shard: FSDP's hook is outside, so the recomputation in backward runs on
  // the parameters FSDP's pre-backward hook has just unsharded.
  const int rank = titan_test::world()->rank();
  titan::DeviceMesh mesh(titan_test::world(), {"dp_shard"}, {titan_test::world()->world_size()});
  const auto o = BlockOptions().dim(16).heads(2).hidden(32).dropout(0.1);
  torch::manual_seed(100 + rank);
  const auto x = torch::randn({2, 8, 16}).to(device());  // this rank's batch; no gradient: the first unit's input
  struct Run {
    std::vector<torch::Tensor> losses, grads;
    int64_t all_gathers = 0;
  };
  auto run = [&](const titan::ActivationCheckpointOptions& options) {
    auto model = make_stack(3, o);
    titan::apply_activation_checkpointing(model->layers, options);
    std::vector<std::shared_ptr<titan::FsdpHook>> units;
    for (const auto& layer : *model->layers) units.push_back(titan::fully_shard(layer, mesh));
    units.push_back(titan::fully_shard(model, mesh));
    Run result;
    for (int step = 0; step < 2; ++step) {
      model->zero_grad();
      torch::manual_seed(1234 + rank);
      auto loss = titan::call(model, x).pow(2).mean();
      loss.backward();
      result.losses.push_back(loss.detach());
    }
    for (const auto& p : model->parameters()) result.grads.push_back(p.grad().clone());
    for (const auto& unit : units) result.all_gathers += unit->stats().all_gathers;
    return result;
  };
  const Run reference = run(ac(titan::AcMode::None));
  for (const auto& options : {ac(titan::AcMode::Full), ac(titan::AcMode::EveryKthLayer, 2), ac(titan::AcMode::PerOperator)}) {
    CAPTURE(static_cast<int>(options.mode()));
    const Run checkpointed = run(options);
    for (size_t i = 0; i < reference.losses.size(); ++i) CHECK_CLOSE(reference.losses[i], checkpointed.losses[i], 0.0);
    REQUIRE(reference.grads.size() == checkpointed.grads.size());
    for (size_t i = 0; i < reference.grads.size(); ++i) CHECK_CLOSE(reference.grads[i], checkpointed.grads[i], 1e-6);
    CHECK(checkpointed.all_gathers == reference.all_gathers);
  }
}
