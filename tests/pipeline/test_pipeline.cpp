// titan/pipeline.hpp: schedule tables and their simulation, splitting a model into stages, and
// training parity: a pipelined model (alone, with FSDP, with tensor parallelism, with both) trains
// like one process training the whole model on the whole batch, with the same parameter names,
// and checkpoints of the stages load into the whole model and back.
// The model is a plain stack of residual blocks written for this test (not the example Llama).
#include "../support/checkpoint_fixtures.hpp"
#include "../support/multirank.hpp"
#include "../support/tp_test_util.hpp"

#include <titan/fsdp.hpp>
#include <titan/meta.hpp>
#include <titan/pipeline.hpp>

#include <algorithm>
#include <cmath>
#include <set>

namespace {

using titan::PipelineScheduleKind;
using torch::Tensor;

// ---------------------------------------------------------------------------------------------
// A user model: embedding, a ModuleList of residual MLP blocks, an output head. Its forward skips
// what a pipeline stage does not hold.

constexpr int64_t kVocab = 12, kDim = 6, kHidden = 8, kSeq = 5;

struct EmbedImpl : torch::nn::Module {
  explicit EmbedImpl(torch::Device device) {
    weight = register_parameter("weight", torch::randn({kVocab, kDim}, torch::TensorOptions().device(device)));
  }
  Tensor forward(const Tensor& tokens) { return torch::embedding(weight, tokens); }  // [B, S] -> [B, S, dim]
  Tensor weight;
};
TORCH_MODULE(Embed);

struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(torch::Device device) {
    w1 = register_module("w1", tp_test::Linear(kDim, kHidden, true, device));
    w2 = register_module("w2", tp_test::Linear(kHidden, kDim, true, device));
  }
  Tensor forward(const Tensor& x) { return x + titan::call(w2, torch::tanh(titan::call(w1, x))); }  // [B, S, dim]
  tp_test::Linear w1{nullptr}, w2{nullptr};
};
TORCH_MODULE(Block);

struct StackImpl : torch::nn::Module {
  StackImpl(int64_t layers, torch::Device device) {
    embed = register_module("embed", Embed(device));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int64_t i = 0; i < layers; ++i) blocks->push_back(Block(device));
    head = register_module("head", tp_test::Linear(kDim, kVocab, false, device));
  }
  /// tokens [B, S] (or the previous stage's [B, S, dim]) -> logits [B, S, vocab] (or [B, S, dim]).
  Tensor forward(const Tensor& x) {
    const auto children = named_children();
    Tensor h = children.contains("embed") ? titan::call(embed, x) : x;  // [B, S, dim]
    for (const auto& block : blocks->children()) h = titan::call(block->as<BlockImpl>(), h);
    return children.contains("head") ? titan::call(head, h) : h;
  }
  Embed embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  tp_test::Linear head{nullptr};
};
TORCH_MODULE(Stack);

titan::PipelineSplit stack_split() { return titan::PipelineSplit().first({"embed"}).layers("blocks").last({"head"}); }

std::set<std::string> parameter_names(const torch::nn::Module& module) {
  std::set<std::string> names;
  for (const auto& item : module.named_parameters()) names.insert(item.key());
  return names;
}

// ---------------------------------------------------------------------------------------------
// Parity runs

struct Setup {
  int64_t pp = 2, dp = 1, tp = 1;
  PipelineScheduleKind schedule = PipelineScheduleKind::OneFOneB;
  int64_t stages_per_rank = 1;
  int64_t microbatches = 4;
  int64_t layers = 8;
};

std::string describe(const Setup& s) {
  return c10::str("PP ", s.pp, " x FSDP ", s.dp, " x TP ", s.tp, ", ", titan::schedule_name(s.schedule), ", ",
                  s.stages_per_rank, " stage(s) per rank, ", s.microbatches, " micro-batches, ", s.layers, " layers");
}

/// Trains the pipelined model and the whole model side by side for 5 AdamW steps: the losses
/// must agree at every step and the (gathered) parameters after the last one.
void check_parity(const Setup& s) {
  const auto& world = titan_test::world();
  if (world->world_size() != s.pp * s.dp * s.tp) return;
  INFO(describe(s));
  const auto device = titan_test::device();
  torch::manual_seed(5);
  Stack reference(s.layers, device);
  titan::DeviceMesh mesh(world, {"pp", "dp_shard", "tp"}, {s.pp, s.dp, s.tp});
  const int64_t rank = mesh.coordinate("pp"), stages = s.pp * s.stages_per_rank;

  // This rank's stages: built on meta, cut, parallelized, materialised, loaded.
  std::vector<Stack> parts;
  std::vector<titan::PipelineStage> pipeline_stages;
  for (int64_t v = 0; v < s.stages_per_rank; ++v) {
    const int64_t stage = rank + v * s.pp;
    Stack part(s.layers, torch::kMeta);
    titan::keep_pipeline_stage(*part, stack_split(), stages, stage);
    if (s.tp > 1) {
      titan::ParallelizePlan plan;
      plan.add("blocks.*.w1", titan::ColwiseParallel())
          .add("blocks.*.w2", titan::RowwiseParallel())
          .add("head", titan::ColwiseParallel().output_layout(titan::Replicate()));
      titan::parallelize_module(part, mesh["tp"], titan::plan_for_stage(plan, *part));
    }
    if (s.dp > 1) {
      // torchtitan's policy with pipelining: no resharding after forward (each stage runs forward
      // once per micro-batch).
      const auto fsdp = titan::FsdpOptions().reshard_after_forward(false);
      for (const auto& block : part->blocks->children()) titan::fully_shard(*block, mesh["dp_shard"], fsdp);
      const auto children = part->named_children();  // a middle stage holds only blocks: no root unit
      if (children.contains("embed") || children.contains("head")) titan::fully_shard(part, mesh["dp_shard"], fsdp);
    }
    titan::to_empty(*part, device);
    titan::load_full_state_dict(part, tp_test::full_state(*reference));
    auto module = part.ptr();
    pipeline_stages.emplace_back(stage, module, [module](const Tensor& x) { return titan::call(*module, x); });
    parts.push_back(part);
  }
  // Every parameter of the whole model lives on exactly one stage.
  const auto all = parameter_names(*reference);
  std::vector<std::string> mine;
  for (const auto& part : parts)
    for (const auto& name : parameter_names(*part)) mine.push_back(name);
  for (const auto& name : mine) CHECK(all.count(name) == 1);
  const double held = titan::dist_sum(static_cast<double>(mine.size()), world->group()) / static_cast<double>(s.dp * s.tp);
  CHECK(held == static_cast<double>(all.size()));

  titan::Pipeline pipeline(mesh.group("pp"), pipeline_stages,
                           titan::PipelineOptions().schedule(s.schedule).microbatches(s.microbatches).scale_grads(false));
  auto options = torch::optim::AdamWOptions(1e-2).weight_decay(0.1).eps(1e-6);
  std::vector<Tensor> params;
  for (const auto& part : parts)
    for (const auto& p : part->parameters()) params.push_back(p);
  torch::optim::AdamW opt(params, options), ref_opt(reference->parameters(), options);

  const int64_t per_micro = 2, global = s.dp * s.microbatches * per_micro;
  const int64_t dp_rank = mesh.coordinate("dp_shard");
  for (int step = 0; step < 5; ++step) {
    INFO("step ", step);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + step);
    auto tokens = torch::randint(kVocab, {global, kSeq}, gen, torch::kLong).to(device);  // [global, S]
    auto labels = torch::randint(kVocab, {global, kSeq}, gen, torch::kLong).to(device);  // [global, S]
    labels.index_put_({0, 1}, -100);  // an ignored label: the loss weighs tokens, not rows
    const double valid = labels.ne(-100).sum().item<double>();

    ref_opt.zero_grad();
    auto ref_loss = torch::nn::functional::cross_entropy(reference->forward(tokens).flatten(0, 1), labels.flatten(),
                                                         torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
    ref_loss.backward();
    ref_opt.step();

    // This dp rank's rows, cut into micro-batches; each micro-batch's token-loss sum is scaled
    // so that the sum over micro-batches and FSDP's mean over dp give the global token mean
    // (backpropagated as returned: scale_grads(false)).
    auto my_tokens = tokens.narrow(0, dp_rank * s.microbatches * per_micro, s.microbatches * per_micro);
    auto my_labels = labels.narrow(0, dp_rank * s.microbatches * per_micro, s.microbatches * per_micro);
    std::vector<Tensor> inputs;
    for (int64_t mb = 0; mb < s.microbatches; ++mb) inputs.push_back(my_tokens.narrow(0, mb * per_micro, per_micro));
    auto loss_fn = [&](const Tensor& logits, int64_t mb) {  // logits [per_micro, S, vocab]
      auto target = my_labels.narrow(0, mb * per_micro, per_micro);
      return torch::nn::functional::cross_entropy(
                 logits.flatten(0, 1), target.flatten(),
                 torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum)) *
             (static_cast<double>(s.dp) / valid);
    };
    opt.zero_grad();
    auto losses = pipeline.step(inputs, loss_fn);
    CHECK(static_cast<int64_t>(losses.size()) == (pipeline.has_last_stage() ? s.microbatches : 0));
    double local = 0;
    for (const auto& l : losses) local += l.item<double>();
    const double loss = titan::dist_sum(local, world->group()) / static_cast<double>(s.dp * s.tp);
    CHECK(std::abs(loss - ref_loss.item<double>()) < 1e-5);
    opt.step();
  }
  // With FSDP the micro-batches of a step share one all-gather and one reduce-scatter per unit.
  for (const auto& part : parts) {
    for (const auto& unit : titan::detail::hooks_in_subtree<titan::FsdpHook>(*part)) {
      CHECK(unit->stats().all_gathers == 5);
      CHECK(unit->stats().reduce_scatters == 5);
    }
    CHECK(titan::memory_usage(*part).unsharded_bytes == 0);  // freed by each stage's last backward
  }
  const auto expected = reference->named_parameters();
  for (const auto& part : parts) {
    for (const auto& [name, tensor] : titan::sharded_parameters(*part)) {
      INFO("parameter ", name, " (", tensor.layout.placement(), ")");
      CHECK_CLOSE(titan::gather_full(tensor), expected[name], tp_test::kAdamParamTol);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Schedules

namespace {

/// Rank `rank`'s actions, each followed by a space: "F0.0 F0.1 B0.0 ".
std::string row(const titan::PipelineSchedule& schedule, size_t rank) {
  std::string text;
  for (const auto& a : schedule.actions[rank]) text += a.text() + " ";
  return text;
}

}  // namespace

TEST_CASE("pipeline: schedule tables of GPipe, 1F1B, interleaved 1F1B and ZB-H1") {
  auto gpipe = titan::make_pipeline_schedule(PipelineScheduleKind::GPipe, 2, 3);
  CHECK(gpipe.table() == "rank 0: F0.0 F0.1 F0.2 B0.0 B0.1 B0.2\nrank 1: F1.0 F1.1 F1.2 B1.0 B1.1 B1.2\n");
  auto one = titan::make_pipeline_schedule(PipelineScheduleKind::OneFOneB, 4, 6);
  MESSAGE("1F1B, 4 ranks, 6 micro-batches:\n" << one.table());
  CHECK(one.actions[0].size() == 12);
  CHECK(row(one, 0) == "F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 B0.3 B0.4 B0.5 ");
  CHECK(row(one, 3) == "F3.0 B3.0 F3.1 B3.1 F3.2 B3.2 F3.3 B3.3 F3.4 B3.4 F3.5 B3.5 ");
  auto interleaved = titan::make_pipeline_schedule(PipelineScheduleKind::Interleaved1F1B, 2, 4, 2);
  MESSAGE("Interleaved1F1B, 2 ranks x 2 stages, 4 micro-batches:\n" << interleaved.table());
  // Rank 1 holds stages 1 and 3: two micro-batches through stage 1, then through stage 3, ...
  CHECK(row(interleaved, 1) == "F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3 ");
  auto zb = titan::make_pipeline_schedule(PipelineScheduleKind::ZeroBubbleH1, 4, 6);
  MESSAGE("ZBH1, 4 ranks, 6 micro-batches:\n" << zb.table());
  CHECK(row(zb, 0) ==
        "F0.0 F0.1 F0.2 F0.3 I0.0 W0.0 F0.4 I0.1 W0.1 F0.5 I0.2 W0.2 I0.3 W0.3 I0.4 W0.4 I0.5 W0.5 ");
  // The last rank defers its weight passes, so its forwards, and the input passes behind them, come sooner.
  CHECK(row(zb, 3) ==
        "F3.0 I3.0 F3.1 I3.1 F3.2 I3.2 F3.3 I3.3 W3.0 F3.4 I3.4 W3.1 F3.5 I3.5 W3.2 W3.3 W3.4 W3.5 ");
}

TEST_CASE("pipeline: simulated schedules are complete, deadlock-free and meet the bubble formulas") {
  for (int64_t p : {1, 2, 3, 4}) {
    for (int64_t m = 1; m <= 9; ++m) {
      INFO("p ", p, ", m ", m);
      for (auto kind : {PipelineScheduleKind::GPipe, PipelineScheduleKind::OneFOneB, PipelineScheduleKind::ZeroBubbleH1})
        titan::simulate_schedule(titan::make_pipeline_schedule(kind, p, m));
      if (m % p == 0)
        for (int64_t v : {2, 3})
          titan::simulate_schedule(titan::make_pipeline_schedule(PipelineScheduleKind::Interleaved1F1B, p, m, v));
    }
  }
  // Forward 1, backward 2 (input 1 + weight 1), free communication.
  for (int64_t p : {2, 4}) {
    for (int64_t m : {4, 8, 16}) {
      INFO("p ", p, ", m ", m);
      const double formula = double(p - 1) / double(m + p - 1);
      auto one = titan::simulate_schedule(titan::make_pipeline_schedule(PipelineScheduleKind::OneFOneB, p, m));
      auto gpipe = titan::simulate_schedule(titan::make_pipeline_schedule(PipelineScheduleKind::GPipe, p, m));
      CHECK(one.bubble() == doctest::Approx(formula));
      CHECK(gpipe.bubble() == doctest::Approx(formula));
      // 1F1B holds at most p - r micro-batches on rank r, GPipe all m.
      for (int64_t r = 0; r < p; ++r) {
        CHECK(one.peak_live[static_cast<size_t>(r)] == std::min(m, p - r));
        CHECK(gpipe.peak_live[static_cast<size_t>(r)] == m);
      }
      // Interleaved with v stages of 1/v of the work each: (p - 1) / (v m + p - 1).
      const int64_t v = 2;
      auto inter = titan::simulate_schedule(titan::make_pipeline_schedule(PipelineScheduleKind::Interleaved1F1B, p, m, v),
                                            1.0 / v, 1.0 / v, 1.0 / v);
      CHECK(inter.bubble() == doctest::Approx(double(p - 1) / double(v * m + p - 1)));
      auto zb = titan::simulate_schedule(titan::make_pipeline_schedule(PipelineScheduleKind::ZeroBubbleH1, p, m));
      MESSAGE("p ", p, " m ", m, ": 1F1B bubble ", one.bubble(), ", interleaved ", inter.bubble(), ", ZB-H1 ",
              zb.bubble());
      // ZB-H1 with forward = input = weight: (p - 1) / (3 m + p - 1), within 1F1B's peak memory (p
      // micro-batches, on rank 0).
      CHECK(zb.bubble() == doctest::Approx(double(p - 1) / double(3 * m + p - 1)));
      for (int64_t r = 0; r < p; ++r) CHECK(zb.peak_live[static_cast<size_t>(r)] <= std::min(m, p));
    }
  }
}

TEST_CASE("pipeline: schedules reject micro-batch counts and stage counts they cannot use") {
  using titan_test::error_of;
  CHECK(error_of([] { titan::make_pipeline_schedule(PipelineScheduleKind::Interleaved1F1B, 4, 6, 2); })
            .find("divisible by the pipeline degree 4; got 6 micro-batches (use 8)") != std::string::npos);
  CHECK(error_of([] { titan::make_pipeline_schedule(PipelineScheduleKind::OneFOneB, 2, 0); })
            .find("at least one micro-batch") != std::string::npos);
  CHECK(error_of([] { titan::make_pipeline_schedule(PipelineScheduleKind::OneFOneB, 2, 4, 2); })
            .find("one stage per rank") != std::string::npos);
  CHECK(error_of([] { titan::make_pipeline_schedule(PipelineScheduleKind::Interleaved1F1B, 2, 4, 1); })
            .find("several stages per rank") != std::string::npos);
  CHECK(error_of([] { titan::parse_schedule("2F2B"); }).find("unknown schedule '2F2B'") != std::string::npos);
  CHECK(titan::parse_schedule("Interleaved1F1B") == PipelineScheduleKind::Interleaved1F1B);
  // A broken table: rank 0 waits for a gradient that rank 1 only sends after its own wait.
  auto broken = titan::make_pipeline_schedule(PipelineScheduleKind::OneFOneB, 2, 2);
  std::swap(broken.actions[1][0], broken.actions[1][1]);  // B1.0 before F1.0
  CHECK(error_of([&] { titan::simulate_schedule(broken); }).find("deadlocks: rank 0 waits forever at B0.0, rank 1 waits forever at B1.0") !=
        std::string::npos);
  // Rank 1 takes micro-batch 1 first: no deadlock, but NCCL would hand it micro-batch 0's data.
  auto swapped = titan::make_pipeline_schedule(PipelineScheduleKind::GPipe, 2, 2);
  std::swap(swapped.actions[1][0], swapped.actions[1][1]);
  CHECK(error_of([&] { titan::simulate_schedule(swapped); })
            .find("rank 1 receives the messages of rank 0 in another order than they are sent") != std::string::npos);
}

TEST_CASE("pipeline: the zero-bubble weight pass starts from gradients captured by the input pass") {
  // y = tanh(x W1^T + b1) W2^T, a 2-layer MLP; the input pass computes dx, the weight pass the rest.
  auto run = [](bool tied) {
    torch::manual_seed(0);
    auto w1 = torch::randn({5, 4}, torch::requires_grad()), b1 = torch::randn({5}, torch::requires_grad());
    auto w2 = tied ? w1 : torch::randn({5, 5}, torch::requires_grad());
    auto x = torch::randn({3, 4}, torch::requires_grad());
    auto h = torch::tanh(torch::nn::functional::linear(x, w1, b1));                             // [3, 5]
    auto y = tied ? torch::nn::functional::linear(h.narrow(1, 0, 4), w1) : torch::matmul(h, w2.t());  // [3, 5]
    auto grad = torch::randn(y.sizes());
    std::vector<torch::Tensor> params{w1, b1};
    if (!tied) params.push_back(w2);
    auto pass = titan::detail::prepare_weight_pass(y, x, params);
    auto dx = torch::autograd::grad({y}, {x}, {grad}, /*retain_graph=*/true)[0];
    for (const auto& p : params) CHECK_FALSE(p.grad().defined());  // the input pass left them alone
    if (pass)
      pass->run();
    else
      torch::autograd::backward({y}, {grad}, /*retain_graph=*/false, /*create_graph=*/false, params);
    std::vector<torch::Tensor> got;
    for (const auto& p : params) got.push_back(p.grad().clone());
    // The reference: one full backward of a fresh graph.
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    auto h2 = torch::tanh(torch::nn::functional::linear(x.detach().requires_grad_(), w1, b1));
    auto y2 = tied ? torch::nn::functional::linear(h2.narrow(1, 0, 4), w1) : torch::matmul(h2, w2.t());
    y2.backward(grad);
    for (size_t i = 0; i < params.size(); ++i) CHECK(torch::allclose(got[i], params[i].grad()));
    return pass.has_value();
  };
  CHECK(run(false));       // a branch point per layer (W1 and b1 below the first, W2 below the second)
  CHECK_FALSE(run(true));  // W1 used twice: no split (the caller re-runs backward for the weights)
}

// ---------------------------------------------------------------------------------------------
// Stages

TEST_CASE("pipeline: a model split by layer counts or split points keeps its parameter names") {
  using titan_test::error_of;
  Stack model(5, torch::kMeta);
  auto even = titan::pipeline_stage_modules(*model, stack_split(), 2);
  CHECK(even[0] == std::vector<std::string>{"embed", "blocks.0", "blocks.1", "blocks.2"});
  CHECK(even[1] == std::vector<std::string>{"blocks.3", "blocks.4", "head"});
  auto points = titan::pipeline_stage_modules(*model, stack_split().split_points({"blocks.1", "blocks.4"}), 3);
  CHECK(points[0] == std::vector<std::string>{"embed", "blocks.0"});
  CHECK(points[1] == std::vector<std::string>{"blocks.1", "blocks.2", "blocks.3"});
  CHECK(points[2] == std::vector<std::string>{"blocks.4", "head"});

  Stack middle(5, torch::kMeta);
  titan::keep_pipeline_stage(*middle, stack_split().split_points({"blocks.1", "blocks.4"}), 3, 1);
  CHECK(parameter_names(*middle) ==
        std::set<std::string>{"blocks.1.w1.weight", "blocks.1.w1.bias", "blocks.1.w2.weight", "blocks.1.w2.bias",
                              "blocks.2.w1.weight", "blocks.2.w1.bias", "blocks.2.w2.weight", "blocks.2.w2.bias",
                              "blocks.3.w1.weight", "blocks.3.w1.bias", "blocks.3.w2.weight", "blocks.3.w2.bias"});
  // The middle stage maps activations to activations with its three blocks only.
  titan::to_empty(*middle, torch::kCPU);
  for (auto& p : middle->parameters()) p.data().normal_();
  CHECK(middle->forward(torch::randn({2, kSeq, kDim})).sizes() == torch::IntArrayRef{2, kSeq, kDim});

  CHECK(error_of([&] { titan::pipeline_stage_modules(*model, stack_split(), 6); })
            .find("5 layers cannot fill 6 stages") != std::string::npos);
  CHECK(error_of([&] { titan::pipeline_stage_modules(*model, stack_split().split_points({"blocks.9"}), 2); })
            .find("split point 'blocks.9' is not a layer") != std::string::npos);
  CHECK(error_of([&] {
          titan::pipeline_stage_modules(*model, stack_split().split_points({"blocks.3", "blocks.3"}), 3);
        }).find("leaves stage 1 without layers") != std::string::npos);
  CHECK(error_of([&] { titan::pipeline_stage_modules(*model, stack_split().split_points({"blocks.3"}), 3); })
            .find("1 split points make 2 stages but the pipeline has 3") != std::string::npos);
  CHECK(error_of([&] { titan::pipeline_stage_modules(*model, stack_split().last({}), 2); })
            .find("parameter 'head.weight' is in no stage") != std::string::npos);
  CHECK(error_of([&] { titan::pipeline_stage_modules(*model, stack_split().first({"embedding"}), 2); })
            .find("no module 'embedding'") != std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Training parity

TEST_CASE("pipeline: one rank runs a single stage, or two stages handing over locally") {
  check_parity({1, 1, 1, PipelineScheduleKind::OneFOneB, 1, 2, 3});
  check_parity({1, 1, 1, PipelineScheduleKind::Interleaved1F1B, 2, 2, 4});
}

TEST_CASE("pipeline: PP 2 and PP 4, every schedule, trains like the whole model") {
  for (int64_t pp : {2, 4}) {
    const int64_t m = 2 * pp;
    check_parity({pp, 1, 1, PipelineScheduleKind::GPipe, 1, m, 8});
    check_parity({pp, 1, 1, PipelineScheduleKind::OneFOneB, 1, m, 8});
    check_parity({pp, 1, 1, PipelineScheduleKind::OneFOneB, 1, pp + 1, 8});  // m not a multiple of p
    check_parity({pp, 1, 1, PipelineScheduleKind::ZeroBubbleH1, 1, m, 8});
    check_parity({pp, 1, 1, PipelineScheduleKind::Interleaved1F1B, 2, m, 8});
  }
}

TEST_CASE("pipeline: PP 2 x FSDP 2 and PP 2 x TP 2 train like the whole model") {
  check_parity({2, 2, 1, PipelineScheduleKind::OneFOneB, 1, 4, 8});
  check_parity({2, 2, 1, PipelineScheduleKind::Interleaved1F1B, 2, 4, 8});
  check_parity({2, 1, 2, PipelineScheduleKind::OneFOneB, 1, 4, 8});
  check_parity({2, 1, 2, PipelineScheduleKind::ZeroBubbleH1, 1, 4, 8});
}

TEST_CASE("pipeline: PP 2 x FSDP 2 x TP 2 (8 ranks) trains like the whole model") {
  check_parity({2, 2, 2, PipelineScheduleKind::OneFOneB, 1, 4, 8});
  check_parity({2, 2, 2, PipelineScheduleKind::Interleaved1F1B, 2, 4, 8});
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST_CASE("pipeline: bad setups are errors at start") {
  using titan_test::error_of;
  const auto& world = titan_test::world();
  titan::DeviceMesh mesh(world, {"pp", "dp_shard"}, {1, world->world_size()});
  Stack model(2, titan_test::device());
  auto module = model.ptr();
  auto forward = [module](const Tensor& x) { return titan::call(*module, x); };
  CHECK(error_of([&] {
          titan::Pipeline(mesh.group("pp"), {titan::PipelineStage(1, module, forward)}, titan::PipelineOptions());
        }).find("has index 1; expected 0") != std::string::npos);
  titan::Pipeline pipeline(mesh.group("pp"), {titan::PipelineStage(0, module, forward)},
                           titan::PipelineOptions().microbatches(2));
  auto loss = [](const Tensor& logits, int64_t) { return logits.sum(); };
  CHECK(error_of([&] { pipeline.step({torch::zeros({1, kSeq}, torch::kLong).to(titan_test::device())}, loss); })
            .find("got 1 micro-batch inputs; the pipeline was made for 2") != std::string::npos);
  titan::fully_shard(model, mesh["dp_shard"]);
  CHECK(error_of([&] {
          titan::Pipeline(mesh.group("pp"), {titan::PipelineStage(0, module, forward)},
                          titan::PipelineOptions().schedule(PipelineScheduleKind::ZeroBubbleH1));
        }).find("ZBH1 splits backward") != std::string::npos);
}

TEST_CASE("pipeline: a stage run with ->forward, or whose root is not sharded, fails at the first step naming it") {
  using titan_test::error_of;
  const auto& world = titan_test::world();
  titan::DeviceMesh mesh(world, {"pp", "dp_shard"}, {1, world->world_size()});
  auto loss = [](const Tensor& logits, int64_t) { return logits.sum(); };
  const std::vector<Tensor> inputs{torch::zeros({1, kSeq}, torch::kLong).to(titan_test::device())};
  {
    Stack model(2, titan_test::device());
    for (const auto& block : model->blocks->children()) titan::fully_shard(*block, mesh["dp_shard"]);
    titan::fully_shard(model, mesh["dp_shard"]);
    auto module = model.ptr();
    titan::Pipeline pipeline(mesh.group("pp"), {titan::PipelineStage(0, module, [module](const Tensor& x) {
                                                  return module->forward(x);  // skips the root's hooks
                                                })},
                             titan::PipelineOptions().microbatches(1));
    const auto message = error_of([&] { pipeline.step(inputs, loss); });  // at the first forward
    CHECK(message.find("titan::Pipeline: stage 0 failed on micro-batch 0") != std::string::npos);
    CHECK(message.find("the unit of 'blocks.0' ran outside the forward of the unit enclosing it") != std::string::npos);
  }
  {
    Stack model(2, titan_test::device());
    for (const auto& block : model->blocks->children()) titan::fully_shard(*block, mesh["dp_shard"]);  // not the root
    auto module = model.ptr();
    titan::Pipeline pipeline(mesh.group("pp"), {titan::PipelineStage(0, module, [module](const Tensor& x) {
                                                  return titan::call(*module, x);
                                                })},
                             titan::PipelineOptions().microbatches(1));
    CHECK(error_of([&] { pipeline.step(inputs, loss); }).find("belong to no fully_shard unit ('embed.weight'") !=
          std::string::npos);
  }
  {  // An error inside a stage keeps its type (an index error here) and gains the stage's context.
    Stack model(2, titan_test::device());
    auto module = model.ptr();
    titan::Pipeline pipeline(mesh.group("pp"), {titan::PipelineStage(0, module, [](const Tensor& x) {
                                                  TORCH_CHECK_INDEX(false, "index 9 is out of bounds");
                                                  return x;
                                                })},
                             titan::PipelineOptions().microbatches(1));
    std::string message;
    try {
      pipeline.step(inputs, loss);
    } catch (const c10::IndexError& e) {
      message = e.what();
    }
    CHECK(message.find("index 9 is out of bounds") != std::string::npos);
    CHECK(message.find("titan::Pipeline: stage 0 failed on micro-batch 0, whose input is the micro-batch") !=
          std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

TEST_CASE("pipeline: a checkpoint of the stages loads into the whole model and back") {
  const auto& world = titan_test::world();
  if (world->world_size() != 2) return;
  const auto device = titan_test::device();
  torch::manual_seed(3);
  Stack whole(4, device);
  const int64_t rank = world->rank();
  auto stage_of = [&](const Stack& source) {  // this rank's stage with `source`'s values
    Stack part(4, torch::kMeta);
    titan::keep_pipeline_stage(*part, stack_split(), 2, rank);
    titan::to_empty(*part, device);
    titan::load_full_state_dict(part, tp_test::full_state(*source));
    return part;
  };
  auto same_as_whole = [&](const torch::nn::Module& model) {
    const auto expected = whole->named_parameters();
    for (const auto& item : model.named_parameters()) {
      INFO("parameter ", item.key());
      CHECK(titan_test::same_values(item.value(), expected[item.key()]));
    }
  };
  // The stages' checkpoint (each rank saves its stage) into the whole model on every rank.
  const auto staged_dir = titan_ckpt::shared_dir(world, "pipeline_stages");
  auto part = stage_of(whole);
  titan::TrainState staged;
  staged.model = part.get();
  titan::CheckpointManager(world, titan::CheckpointOptions(staged_dir)).save(1, staged);
  torch::manual_seed(4);
  Stack loaded(4, device);
  titan::TrainState everything;
  everything.model = loaded.get();
  CHECK(titan::CheckpointManager(world, titan::CheckpointOptions(staged_dir)).load(1, everything) == 1);
  same_as_whole(*loaded);
  CHECK(parameter_names(*loaded) == parameter_names(*whole));

  // The whole model's checkpoint into the stages.
  const auto whole_dir = titan_ckpt::shared_dir(world, "pipeline_whole");
  titan::TrainState all;
  all.model = whole.get();
  titan::CheckpointManager(world, titan::CheckpointOptions(whole_dir)).save(1, all);
  torch::manual_seed(5);
  Stack other(4, device);
  auto fresh = stage_of(other);
  titan::TrainState stage_state;
  stage_state.model = fresh.get();
  titan::CheckpointManager(world, titan::CheckpointOptions(whole_dir)).load(1, stage_state);
  same_as_whole(*fresh);

  // A tensor that no rank's model holds is still an error, on every rank.
  Stack smaller(3, device);
  titan::TrainState small;
  small.model = smaller.get();
  const auto error =
      titan_test::error_of([&] { titan::CheckpointManager(world, titan::CheckpointOptions(whole_dir)).load(1, small); });
  CHECK_MESSAGE(error.find("holds tensor 'model.blocks.3.w1.bias' that the model does not have") != std::string::npos,
                error);
}

namespace {
/// Stack with the forward a new user might write: it loops over the ModuleList's own vector,
/// which still lists the layers keep_pipeline_stage removed.
struct VectorLoopImpl : StackImpl {
  using StackImpl::StackImpl;
  Tensor forward(const Tensor& x) {
    const auto children = named_children();
    Tensor h = children.contains("embed") ? titan::call(embed, x) : x;
    for (const auto& block : *blocks) h = titan::call(block->as<BlockImpl>(), h);
    return children.contains("head") ? titan::call(head, h) : h;
  }
};
TORCH_MODULE(VectorLoop);

/// Stack not adapted to stages: it always embeds its input.
struct UnadaptedImpl : StackImpl {
  using StackImpl::StackImpl;
  Tensor forward(const Tensor& x) {
    Tensor h = embed->forward(x);  // [B, S, dim]; on a later stage x is already an activation
    for (const auto& block : blocks->children()) h = titan::call(block->as<BlockImpl>(), h);
    return named_children().contains("head") ? titan::call(head, h) : h;
  }
};
TORCH_MODULE(Unadapted);
}  // namespace

TEST_CASE("pipeline: a forward that reaches a layer keep_pipeline_stage removed fails naming it and its stage") {
  VectorLoop model(2, titan_test::device());
  titan::keep_pipeline_stage(*model, stack_split(), 2, 0);
  const auto tokens = torch::zeros({1, kSeq}, torch::kLong).to(titan_test::device());
  CHECK(titan_test::error_of([&] { titan::call(model, tokens); })
            .find("titan pipeline: module 'blocks.1' ran in stage 0, but stage 1 holds it") != std::string::npos);
}

TEST_CASE("pipeline: a model not adapted to stages fails naming the stage, its input and the fix") {
  const auto& world = titan_test::world();
  titan::DeviceMesh mesh(world, {"pp", "dp_shard"}, {1, world->world_size()});
  std::vector<titan::PipelineStage> stages;  // both stages on this rank
  for (int64_t s = 0; s < 2; ++s) {
    Unadapted part(2, titan_test::device());
    titan::keep_pipeline_stage(*part, stack_split(), 2, s);
    auto module = part.ptr();
    stages.emplace_back(s, module, [module](const Tensor& x) { return titan::call(*module, x); });
  }
  titan::Pipeline pipeline(mesh.group("pp"), stages,
                           titan::PipelineOptions().schedule(PipelineScheduleKind::Interleaved1F1B).microbatches(2));
  const std::vector<Tensor> inputs(2, torch::zeros({1, kSeq}, torch::kLong).to(titan_test::device()));
  const auto message = titan_test::error_of([&] { pipeline.step(inputs, [](const Tensor& y, int64_t) { return y.sum(); }); });
  CHECK(message.find("titan::Pipeline: stage 1 failed on micro-batch 0, whose input is the activation of stage 0 "
                     "(Float [1, 5, 6])") != std::string::npos);
  CHECK(message.find("the model's forward must skip the modules its stage does not hold") != std::string::npos);
}

TEST_CASE("pipeline: a stage function that takes the micro-batch index gets the one it runs, in every schedule") {
  // Each stage scales its output by a factor of the micro-batch (an input every stage reads besides
  // the activation): the losses and gradients are those of the same computation without a pipeline.
  const auto& world = titan_test::world();
  titan::DeviceMesh mesh(world, {"pp", "dp_shard"}, {1, world->world_size()});
  torch::manual_seed(9);
  const int64_t m = 4, rows = 2;
  Stack model(2, titan_test::device());
  auto gen = at::make_generator<at::CPUGeneratorImpl>(10);
  auto tokens = torch::randint(kVocab, {m * rows, kSeq}, gen, torch::kLong).to(titan_test::device());  // [8, S]
  const std::vector<double> factor = {0.5, 2.0, -1.0, 3.0};  // per micro-batch
  auto mb_loss = [](const Tensor& y) { return y.pow(2).mean(); };
  std::vector<Tensor> inputs;
  for (int64_t k = 0; k < m; ++k) inputs.push_back(tokens.narrow(0, k * rows, rows));
  const std::pair<int64_t, PipelineScheduleKind> cases[] = {{1, PipelineScheduleKind::GPipe},
                                                            {1, PipelineScheduleKind::OneFOneB},
                                                            {1, PipelineScheduleKind::ZeroBubbleH1},
                                                            {2, PipelineScheduleKind::Interleaved1F1B}};
  for (const auto& [count, kind] : cases) {
    CAPTURE(count);
    CAPTURE(static_cast<int>(kind));
    std::vector<Stack> parts;  // the stages on this rank, with the weights of `model`
    std::vector<titan::PipelineStage> stages;
    for (int64_t s = 0; s < count; ++s) {
      Stack part(2, titan_test::device());
      titan::keep_pipeline_stage(*part, stack_split(), count, s);
      {
        torch::NoGradGuard no_grad;
        for (auto& item : part->named_parameters()) item.value().copy_(model->named_parameters()[item.key()]);
      }
      parts.push_back(part);
      auto module = part.ptr();
      stages.emplace_back(s, module, [module, &factor](const Tensor& x, int64_t mb) {
        return titan::call(*module, x) * factor[static_cast<size_t>(mb)];
      });
    }
    // The reference: the stages one after the other, each output scaled by its micro-batch's factor.
    std::vector<double> expected_losses;
    for (int64_t k = 0; k < m; ++k) {
      Tensor y = inputs[k];
      for (auto& part : parts) y = titan::call(part, y) * factor[static_cast<size_t>(k)];
      const auto loss = mb_loss(y);
      expected_losses.push_back(loss.item<double>());
      loss.backward();
    }
    std::vector<Tensor> expected;
    for (auto& part : parts)
      for (auto& p : part->parameters()) {
        expected.push_back(p.grad().clone());
        p.mutable_grad() = Tensor();
      }
    titan::Pipeline pipeline(mesh.group("pp"), stages,
                             titan::PipelineOptions().schedule(kind).microbatches(m).scale_grads(false));
    auto losses = pipeline.step(inputs, [&](const Tensor& y, int64_t) { return mb_loss(y); });
    for (int64_t k = 0; k < m; ++k) CHECK(std::abs(losses[k].item<double>() - expected_losses[k]) < 1e-6);
    size_t i = 0;
    for (auto& part : parts)
      for (auto& p : part->parameters()) CHECK_CLOSE(p.grad(), expected[i++], 1e-6);
    CHECK(i == expected.size());
  }
}

TEST_CASE("pipeline: the schedule divides each micro-batch's mean loss by the micro-batch count (scale_grads)") {
  const auto& world = titan_test::world();
  titan::DeviceMesh mesh(world, {"pp", "dp_shard"}, {1, world->world_size()});
  torch::manual_seed(7);
  Stack model(2, titan_test::device());
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  const int64_t m = 4, rows = 2;
  auto tokens = torch::randint(kVocab, {m * rows, kSeq}, gen, torch::kLong).to(titan_test::device());  // [8, S]
  auto labels = torch::randint(kVocab, {m * rows, kSeq}, gen, torch::kLong).to(titan_test::device());  // [8, S]
  auto mean_loss = [](const Tensor& logits, const Tensor& target) {  // logits [B, S, vocab]
    return torch::nn::functional::cross_entropy(logits.flatten(0, 1), target.flatten());
  };
  const auto whole = mean_loss(model->forward(tokens), labels);  // the whole batch's mean, one process
  whole.backward();
  std::vector<Tensor> expected;
  for (auto& p : model->parameters()) {
    expected.push_back(p.grad().clone());
    p.mutable_grad() = Tensor();
  }
  std::vector<Tensor> inputs;
  for (int64_t k = 0; k < m; ++k) inputs.push_back(tokens.narrow(0, k * rows, rows));
  auto loss_fn = [&](const Tensor& logits, int64_t k) { return mean_loss(logits, labels.narrow(0, k * rows, rows)); };
  auto module = model.ptr();
  const std::vector<titan::PipelineStage> stages{
      titan::PipelineStage(0, module, [module](const Tensor& x) { return titan::call(*module, x); })};
  for (bool scale : {true, false}) {
    INFO("scale_grads ", scale);
    titan::Pipeline pipeline(mesh.group("pp"), stages, titan::PipelineOptions().microbatches(m).scale_grads(scale));
    auto losses = pipeline.step(inputs, loss_fn);
    double sum = 0;
    for (const auto& l : losses) sum += l.item<double>();  // as the loss function returned them
    CHECK(std::abs(sum / static_cast<double>(m) - whole.item<double>()) < 1e-6);
    const auto params = model->parameters();
    for (size_t i = 0; i < params.size(); ++i) {  // unscaled: m times the whole batch's gradients
      CHECK_CLOSE(params[i].grad(), expected[i] * (scale ? 1.0 : static_cast<double>(m)), 1e-6);
      params[i].mutable_grad() = Tensor();
    }
  }
}
