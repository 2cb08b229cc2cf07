// titan/moe.hpp: the MoE layer against transformers' Mixtral, Qwen3-MoE and DeepSeek-V3 blocks
// (outputs, input and weight gradients, the auxiliary loss and its gradient; experts that receive
// no token; DeepSeek's groups, sigmoid scores, correction bias and shared expert) with
// at::_grouped_mm and with the per-expert loop; the Mixtral and Qwen3-MoE blocks (and a top-4
// Qwen3-MoE) in bfloat16, each with its weighing, each token's terms summed in fp32; the same bits
// on every run (on the suite's device: CUDA in the GPU kit); a capacity factor against a plain loop; FSDP over
// the experts against one process; routing with an expert bias; the expert-bias update over the
// ranks, and its balancing of a skewed router; load statistics; errors.
#include "../support/multirank.hpp"
#include "../support/tp_test_util.hpp"

#include <titan/ac.hpp>
#include <titan/fsdp.hpp>
#include <titan/mesh.hpp>
#include <titan/moe.hpp>
#include <titan/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

namespace {

using titan::MoeOptions;
using titan_test::error_of;
using titan_test::world;
using torch::Tensor;

std::string reference_path() {
  const char* path = std::getenv("TITAN_MOE_REFERENCE");
  REQUIRE_MESSAGE(path != nullptr, "TITAN_MOE_REFERENCE is not set: run the suite with ctest (the fixture ",
                  "moe.reference writes it with tests/moe/make_reference.py)");
  return path;
}

/// The options of transformers' block `name` (see make_reference.py).
MoeOptions block_options(const std::string& name) {
  if (name == "mixtral") return MoeOptions().num_experts(4).top_k(2).route_norm(true);
  if (name == "qwen3") return MoeOptions().num_experts(8).top_k(2).route_norm(false);
  if (name == "qwen3_top4") return MoeOptions().num_experts(8).top_k(4).route_norm(false);
  return MoeOptions()  // DeepSeek-V3
      .num_experts(8).top_k(2).score(titan::RouterScore::Sigmoid).route_norm(true).route_scale(2.5)
      .num_groups(4).top_groups(2).expert_bias(true).shared_hidden(32);
}

/// A MoE layer with the reference's weights of block `name`.
titan::MoE reference_layer(titan::safetensors::File& reference, const std::string& name, MoeOptions options) {
  const auto gate = reference.read(name + ".gate");  // [E, 16]
  const auto w1 = reference.read(name + ".w1");      // [E, 32, 16]
  titan::MoE layer(gate.size(1), w1.size(1), options);
  torch::NoGradGuard no_grad;
  layer->gate->weight.copy_(gate);
  layer->experts->w1.copy_(w1);
  layer->experts->w2.copy_(reference.read(name + ".w2"));
  layer->experts->w3.copy_(reference.read(name + ".w3"));
  if (options.expert_bias()) layer->expert_bias.copy_(reference.read(name + ".bias"));
  if (options.shared_hidden() > 0) {
    layer->shared_experts->w1.copy_(reference.read(name + ".shared_w1"));
    layer->shared_experts->w2.copy_(reference.read(name + ".shared_w2"));
    layer->shared_experts->w3.copy_(reference.read(name + ".shared_w3"));
  }
  return layer;
}

}  // namespace

TEST_CASE("moe: the layer equals transformers' Mixtral, Qwen3-MoE and DeepSeek-V3 blocks, grouped_mm and loop") {
  if (world()->world_size() > 1) return;  // single-process cases: run once, in titan.ranks1
  titan::safetensors::File reference(reference_path());
  for (const std::string name : {"mixtral", "qwen3", "deepseek"}) {
    for (bool grouped : {true, false}) {
      CAPTURE(name);
      CAPTURE(grouped);
      auto read = [&](const std::string& key) { return reference.read(name + "." + key); };
      auto layer = reference_layer(reference, name, block_options(name).grouped_mm(grouped));
      auto x = read("x").requires_grad_(true);  // [2, 5, 16]
      CHECK(layer->experts->runs_grouped(x.reshape({-1, 16})) == grouped);
      auto y = titan::call(layer, x);  // [2, 5, 16]
      y.backward(read("dy"));
      CHECK_CLOSE(y, read("y"), 1e-5);
      CHECK_CLOSE(x.grad(), read("dx"), 1e-5);
      CHECK_CLOSE(layer->gate->weight.grad(), read("dgate"), 1e-5);
      CHECK_CLOSE(layer->experts->w1.grad(), read("dw1"), 1e-5);
      CHECK_CLOSE(layer->experts->w2.grad(), read("dw2"), 1e-5);
      CHECK_CLOSE(layer->experts->w3.grad(), read("dw3"), 1e-5);
      if (layer->shared_experts) {
        CHECK_CLOSE(layer->shared_experts->w1.grad(), read("dshared_w1"), 1e-5);
        CHECK_CLOSE(layer->shared_experts->w2.grad(), read("dshared_w2"), 1e-5);
        CHECK_CLOSE(layer->shared_experts->w3.grad(), read("dshared_w3"), 1e-5);
      }
      // Experts that received no token (the last one, at least): zero gradients, counted so.
      const auto idle = layer->tokens_per_expert().eq(0);  // [E]
      CHECK(idle[layer->options().num_experts() - 1].item<bool>());
      CHECK(layer->experts->w1.grad().index({idle}).abs().max().item<double>() == 0.0);
      CHECK(layer->tokens_per_expert().sum().item<int64_t>() == 2 * 5 * 2);  // T tokens x top-2
    }
  }
}

TEST_CASE("moe: in bfloat16 the layer computes as transformers' Mixtral and Qwen3-MoE blocks do, each token's "
          "terms summed in fp32") {
  if (world()->world_size() > 1) return;
  titan::safetensors::File reference(reference_path());
  // One ulp of bf16 at the reference's largest magnitude: what rounding alone can make differ.
  auto check_within_an_ulp = [](const Tensor& value, const Tensor& expected, const char* what) {
    INFO(what);
    CHECK_CLOSE(value, expected, expected.abs().max().item<double>() * std::ldexp(1.0, -7));
  };
  // transformers' Mixtral weighs each expert's output in fp32 (its router keeps fp32 weights);
  // Qwen3-MoE's router casts the weights to bf16 first, and the product stays bf16.
  for (const auto& [name, fp32_weighting] :
       {std::pair<std::string, bool>{"mixtral", true}, {"qwen3", false}, {"qwen3_top4", false}}) {
    for (bool grouped : {true, false}) {
      CAPTURE(name);
      CAPTURE(grouped);
      const std::string block = name + "_bf16";  // the block run in bf16 on the same values rounded
      auto read = [&](const std::string& key) { return reference.read(block + "." + key); };
      auto options = block_options(name).grouped_mm(grouped).fp32_weighting(fp32_weighting);
      auto layer = reference_layer(reference, block, options);
      layer->to(torch::kBFloat16);
      auto x = read("x").requires_grad_(true);  // [2, 5, 16] bf16
      REQUIRE((x.scalar_type() == torch::kBFloat16));
      CHECK(layer->experts->runs_grouped(x.reshape({-1, 16})) == grouped);
      auto y = titan::call(layer, x);  // [2, 5, 16] bf16
      y.backward(read("dy"));
      // The loop computes each expert as transformers does (per-expert GEMMs; the weighing), and
      // sums a token's weighted outputs in fp32, rounded once: bitwise transformers' outputs summed
      // so. transformers adds them in bf16 (rounding after each add): within an ulp, and with four
      // terms per token not always the same bits. Weighing the other way differs by an ulp.
      if (!grouped) CHECK(torch::equal(y, read("y_fp32_sum")));
      if (name == "qwen3_top4") CHECK_FALSE(torch::equal(read("y"), read("y_fp32_sum")));
      check_within_an_ulp(y, read("y"), "y");
      check_within_an_ulp(x.grad(), read("dx"), "dx");
      check_within_an_ulp(layer->gate->weight.grad(), read("dgate"), "dgate");
      check_within_an_ulp(layer->experts->w1.grad(), read("dw1"), "dw1");
      check_within_an_ulp(layer->experts->w2.grad(), read("dw2"), "dw2");
      check_within_an_ulp(layer->experts->w3.grad(), read("dw3"), "dw3");
      // The other weighing changes the output (these blocks have products that round differently).
      auto other = reference_layer(reference, block, options.fp32_weighting(!fp32_weighting));
      other->to(torch::kBFloat16);
      torch::NoGradGuard no_grad;
      CHECK_FALSE(torch::equal(titan::call(other, read("x")), y.detach()));
    }
  }
}

TEST_CASE("moe: forward and backward give the same bits on every run; each token's eight terms summed in fp32") {
  if (world()->world_size() > 1) return;
  // On CUDA, index_add (a combine) and index_select's gradient (a dispatch's) add a token's rows
  // with atomics, in another order on every run: in bf16, other bits. The layer sums each token's
  // slots instead and its dispatch's gradient sorts. Top-8 of 8 experts: eight terms per token.
  const auto device = titan_test::device();
  torch::manual_seed(11);
  titan::MoE layer(64, 128, MoeOptions().num_experts(8).top_k(8));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) p.normal_(0, 0.1);
  }
  layer->to(device, torch::kBFloat16);
  const auto x = torch::randn({4096, 64}).to(device, torch::kBFloat16);   // [T, dim]
  const auto dy = torch::randn({4096, 64}).to(device, torch::kBFloat16);  // [T, dim]
  auto run = [&] {
    layer->zero_grad();
    auto xin = x.clone().requires_grad_(true);
    auto y = titan::call(layer, xin);  // [T, dim]
    y.backward(dy);
    return std::vector<Tensor>{y.detach(), xin.grad(), layer->gate->weight.grad(), layer->experts->w1.grad(),
                               layer->experts->w2.grad(), layer->experts->w3.grad()};
  };
  const auto first = run();
  for (int again = 0; again < 3; ++again) {
    const auto results = run();
    for (size_t i = 0; i < results.size(); ++i) {
      CAPTURE(again);
      CAPTURE(i);
      CHECK(torch::equal(results[i], first[i]));
    }
  }
  // Every token reaches every expert: the dense sum of the eight weighted outputs (each expert on
  // all tokens, the weight cast to bf16 first as by default) in fp32, rounded once.
  torch::NoGradGuard no_grad;
  const auto scores = torch::softmax(torch::linear(x, layer->gate->weight).to(torch::kFloat), -1);  // [T, E]
  auto dense = torch::zeros({4096, 64}, x.options().dtype(torch::kFloat));                         // [T, dim]
  for (int64_t e = 0; e < 8; ++e) {
    const auto& experts = layer->experts;
    const auto h = titan::swiglu(torch::linear(x, experts->w1[e]), torch::linear(x, experts->w3[e]));  // [T, hidden]
    dense += (torch::linear(h, experts->w2[e]) * scores.select(1, e).unsqueeze(1).to(x.scalar_type())).to(torch::kFloat);
  }
  // Other GEMMs (grouped or per expert on fewer rows) may round a term differently: a few ulps.
  CHECK_CLOSE(first[0].to(torch::kFloat), dense.to(x.scalar_type()).to(torch::kFloat),
              dense.abs().max().item<double>() * std::ldexp(1.0, -6));
}

TEST_CASE("moe: the auxiliary loss equals transformers' load_balancing_loss_func, with its gradient") {
  if (world()->world_size() > 1) return;
  titan::safetensors::File reference(reference_path());
  for (const std::string name : {"mixtral", "qwen3"}) {
    CAPTURE(name);
    auto layer = reference_layer(reference, name, block_options(name).aux_loss(true));
    torch::nn::Sequential model(layer);
    titan::call(layer, reference.read(name + ".x"));
    auto aux = titan::moe_aux_loss(model);
    CHECK_CLOSE(aux.reshape({1}), reference.read(name + ".aux"), 1e-6);
    aux.backward();
    CHECK_CLOSE(layer->gate->weight.grad(), reference.read(name + ".daux_gate"), 1e-6);
    // The statistics were taken: a second call before another forward is an error.
    CHECK(error_of([&] { titan::moe_aux_loss(model); }).find("ran no training forward with gradients") !=
          std::string::npos);
  }
}

TEST_CASE("moe: FSDP over the experts and the gate trains like one process on the whole batch") {
  const auto& world_ = world();
  const int64_t ranks = world_->world_size(), rank = world_->rank();
  auto seeded = [] {
    torch::manual_seed(4);
    titan::MoE layer(16, 32, MoeOptions().num_experts(4).top_k(2));
    {
      torch::NoGradGuard no_grad;
      for (auto& p : layer->parameters()) p.normal_(0, 0.3);
    }
    layer->to(titan_test::device());
    return layer;
  };
  auto reference = seeded();
  auto layer = seeded();
  titan::DeviceMesh mesh(world_, {"dp_shard"}, {ranks});
  titan::fully_shard(layer->experts, mesh);  // w1, w2, w3 sharded along the experts
  titan::fully_shard(layer, mesh);           // the gate
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const auto x = torch::randn({4 * ranks, 3, 16}, gen, torch::kFloat).to(titan_test::device());  // [B, S, dim]
  const auto whole = titan::call(reference, x).pow(2).mean();
  whole.backward();
  const auto mine = x.narrow(0, 4 * rank, 4);  // this rank's rows; FSDP averages the ranks' gradients
  const auto loss = titan::call(layer, mine).pow(2).sum() * (static_cast<double>(ranks) / static_cast<double>(x.numel()));
  loss.backward();
  CHECK(std::abs(titan::dist_sum(loss.item<double>(), world_->group()) / static_cast<double>(ranks) -
                 whole.item<double>()) < 1e-6);
  tp_test::check_gradients_match(*layer, *reference, 1e-5);
}

TEST_CASE("moe: an expert bias chooses the experts, the weights stay the scores'") {
  auto logits = torch::tensor({{2.0f, 1.0f, 0.0f, -1.0f}});  // [1, 4]
  const auto options = MoeOptions().num_experts(4).top_k(2).route_norm(false);
  auto plain = titan::route_tokens(logits, options);
  CHECK(torch::equal(plain.experts, torch::tensor({{0, 1}}, torch::kLong)));
  auto biased = titan::route_tokens(logits, options, torch::tensor({0.0f, 0.0f, 0.0f, 1.0f}));
  // Scores [0.6439, 0.2369, 0.0871, 0.0321]: with the bias expert 3 (1.0321) comes first, then 0.
  CHECK(torch::equal(biased.experts, torch::tensor({{3, 0}}, torch::kLong)));
  CHECK_CLOSE(biased.weights, torch::softmax(logits, -1).index({torch::indexing::Slice(), torch::tensor({3, 0})}),
              1e-7);
  // route_norm and route_scale, and the sigmoid score.
  auto scaled = titan::route_tokens(logits, MoeOptions(options).route_norm(true).route_scale(2.5));
  CHECK_CLOSE(scaled.weights.sum(), torch::tensor(2.5f), 1e-6);
  auto sigmoid = titan::route_tokens(logits, MoeOptions(options).score(titan::RouterScore::Sigmoid));
  CHECK_CLOSE(sigmoid.weights, torch::sigmoid(torch::tensor({{2.0f, 1.0f}})), 1e-7);
  CHECK(titan::parse_router_score("sigmoid") == titan::RouterScore::Sigmoid);
  CHECK(error_of([] { titan::parse_router_score("relu"); }).find("'relu' (expected one of: softmax, sigmoid)") !=
        std::string::npos);
}

TEST_CASE("moe: a capacity factor drops the assignments beyond each expert's capacity, by score or by position") {
  if (world()->world_size() > 1) return;
  for (auto policy : {titan::MoeDropPolicy::ByScore, titan::MoeDropPolicy::ByPosition}) {
    CAPTURE(static_cast<int>(policy));
    torch::manual_seed(6);
    const auto options = MoeOptions().num_experts(4).top_k(2).capacity_factor(0.5).drop_policy(policy);
    titan::MoE layer(8, 16, options);
    {
      torch::NoGradGuard no_grad;
      for (auto& p : layer->parameters()) p.normal_(0, 0.5);
    }
    const auto x = torch::randn({10, 8});  // 20 assignments, capacity ceil(0.5 * 20 / 4) = 3 per expert
    const auto y = titan::call(layer, x);
    // The reference: every expert's assignments in token order (or by weight, highest first),
    // the first three kept, each adding weight * SwiGLU_e(x_t) to its token.
    torch::NoGradGuard no_grad;
    const auto routing = titan::route_tokens(titan::call(layer->gate, x), options);
    auto expected = torch::zeros_like(x);
    int64_t dropped = 0;
    for (int64_t e = 0; e < 4; ++e) {
      using Assignment = std::pair<int64_t, int64_t>;  // (token, slot)
      std::vector<Assignment> mine;
      for (int64_t t = 0; t < 10; ++t)
        for (int64_t j = 0; j < 2; ++j)
          if (routing.experts[t][j].item<int64_t>() == e) mine.emplace_back(t, j);
      if (policy == titan::MoeDropPolicy::ByScore)
        std::stable_sort(mine.begin(), mine.end(), [&](const Assignment& a, const Assignment& b) {
          return routing.weights[a.first][a.second].item<float>() > routing.weights[b.first][b.second].item<float>();
        });
      for (size_t i = 0; i < mine.size(); ++i) {
        if (i >= 3) {
          ++dropped;
          continue;
        }
        const auto [t, j] = mine[i];
        const auto h = torch::silu(torch::mv(layer->experts->w1[e], x[t])) * torch::mv(layer->experts->w3[e], x[t]);
        expected[t] += routing.weights[t][j] * torch::mv(layer->experts->w2[e], h);
      }
    }
    CHECK(dropped > 0);
    CHECK_CLOSE(y, expected, 1e-5);
    torch::nn::Sequential model(layer);
    const auto loads = titan::moe_loads(model);
    CHECK(loads[0].dropped == dropped);
    CHECK(loads[0].tokens.max().item<int64_t>() <= 3);
  }
}

TEST_CASE("moe: update_expert_bias sums the ranks' tokens per expert and moves the bias towards balance") {
  const auto& group = world()->group();
  const int64_t rank = group->rank(), ranks = group->size();
  titan::MoE layer(8, 16, MoeOptions().num_experts(4).top_k(1).expert_bias(true));
  torch::nn::Sequential model(layer);
  {
    torch::NoGradGuard no_grad;
    // Expert 0 wins every token of rank 0; expert 1 every token of the others.
    layer->gate->weight.zero_();
    layer->gate->weight[rank == 0 ? 0 : 1].fill_(1.0);
    for (auto* w : {&layer->experts->w1, &layer->experts->w2, &layer->experts->w3}) w->normal_(0, 0.1);
  }
  titan::call(layer, torch::rand({3, 8}) + 0.1);  // 3 positive tokens
  auto loads = titan::moe_loads(model);
  REQUIRE(loads.size() == 1);
  CHECK(loads[0].layer == "0");
  CHECK(torch::equal(loads[0].tokens, rank == 0 ? torch::tensor({3, 0, 0, 0}, torch::kLong)
                                                : torch::tensor({0, 3, 0, 0}, torch::kLong)));
  CHECK(loads[0].max_over_mean == 4.0);
  titan::update_expert_bias(model, group, 0.01);
  // Over the ranks: expert 0 got 3 tokens, expert 1 3 · (ranks - 1), experts 2 and 3 none.
  auto tokens = torch::tensor({3.0f, 3.0f * static_cast<float>(ranks - 1), 0.0f, 0.0f});
  auto delta = torch::sign(tokens.mean() - tokens) * 0.01;
  CHECK_CLOSE(layer->expert_bias, delta - delta.mean(), 1e-7);
  CHECK_FALSE(layer->tokens_per_expert().defined());  // emptied
}

TEST_CASE("moe: from a skewed router, the expert bias balances the load; the bias is the same on every rank") {
  // Tokens with a common component that router rows 0 and 1 favour: experts 0 and 1 take most
  // tokens (max/mean load above 3 of at most 4). Only the bias moves (no optimizer): it alone must
  // spread the load. (With near one-hot scores every token would follow the bias at once and the
  // fixed-rate update would oscillate: DeepSeek-V3's rule assumes scores that differ per token.)
  const auto& group = world()->group();
  titan::MoE layer(16, 8, MoeOptions().num_experts(8).top_k(2).expert_bias(true));
  torch::manual_seed(3);  // the same weights on every rank
  {
    torch::NoGradGuard no_grad;
    layer->gate->weight.normal_(0, 0.1);
    layer->gate->weight.narrow(0, 0, 2).add_(0.2);
    for (auto* w : {&layer->experts->w1, &layer->experts->w2, &layer->experts->w3}) w->normal_(0, 0.1);
  }
  torch::manual_seed(10 + group->rank());  // each rank its own tokens
  const auto tokens = torch::randn({256, 16}) + 0.5;  // [T, dim]
  auto load = [&] {  // this step's max/mean over every rank's tokens
    titan::call(layer, tokens);
    return titan::moe_loads(layer, /*reset=*/false, group).front().max_over_mean;
  };
  const double first = load();
  CHECK(first > 3.0);
  double last = first;
  for (int step = 0; step < 200; ++step) {
    titan::update_expert_bias(layer, group, 0.002);  // sums the ranks' counts, then empties them
    last = load();
  }
  MESSAGE("max/mean load ", first, " -> ", last, " after 200 bias updates, ", group->size(), " rank(s)");
  CHECK(last < 1.5);
  const auto all = titan::all_gather(layer->expert_bias.reshape({1, -1}), group, 0);  // [ranks, E]
  for (int64_t r = 1; r < group->size(); ++r) CHECK(torch::equal(all[r], all[0]));
}

TEST_CASE("moe: bad options, a mismatched count, and the auxiliary loss under activation checkpointing are errors") {
  if (world()->world_size() > 1) return;
  CHECK(error_of([] { titan::MoE(8, 16, MoeOptions().num_experts(4).top_k(5)); }).find("top_k must be in [1, 4]") !=
        std::string::npos);
  CHECK(error_of([] { titan::MoE(8, 16, MoeOptions().route_scale(0)); }).find("route_scale must be a positive") !=
        std::string::npos);
  CHECK(error_of([] { titan::MoE(8, 16, MoeOptions().num_experts(8).num_groups(3)); })
            .find("num_groups (3) must divide num_experts (8)") != std::string::npos);
  CHECK(error_of([] { titan::MoE(8, 16, MoeOptions().num_experts(8).num_groups(4).top_groups(1).top_k(3)); })
            .find("top_k must be in [1, 2] (the experts of the top_groups best groups), got 3") != std::string::npos);
  CHECK(error_of([] { titan::MoE(8, 16, MoeOptions().capacity_factor(-1)); })
            .find("capacity_factor must be 0 (dropless) or positive, got -1") != std::string::npos);
  titan::GroupedExperts experts(2, 8, 16, /*grouped_mm=*/false);
  CHECK(error_of([&] { experts->forward(torch::zeros({3, 8}), torch::tensor({1, 1}, torch::kLong)); })
            .find("counts sum to 2 but there are 3 rows") != std::string::npos);
  titan::MoE layer(8, 16, MoeOptions().num_experts(4).aux_loss(true));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) p.normal_(0, 0.1);
  }
  titan::checkpoint_wrapper(layer);
  CHECK(error_of([&] { titan::call(layer, torch::randn({3, 8})); }).find("would get no gradient through the router") !=
        std::string::npos);
  torch::nn::Sequential dense(torch::nn::Linear(2, 2));
  CHECK(error_of([&] { titan::moe_aux_loss(dense); }).find("no MoE layer keeps the auxiliary loss's statistics") !=
        std::string::npos);
}
