// titan/tensor_parallel.hpp: every style, loss parallel and a GPT-2 written from scratch match a
// single-process run of the same model (same weights, same inputs) at TP = world size (1, 2 or 4),
// both on titan_test::device().
#include "../support/tiny_gpt2.hpp"
#include "../support/tp_test_util.hpp"

#include <titan/ac.hpp>
#include <titan/fsdp.hpp>
#include <titan/meta.hpp>
#include <titan/tensor_parallel.hpp>

#include "../support/op_events.hpp"

#include <cmath>

namespace {

using namespace tp_test;  // the test layers and the gather/compare helpers
using titan_test::device;
using titan_test::same_values;

/// Two linear layers with biases: x -> w2(gelu(w1(x))).
struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t dim, int64_t hidden, torch::Device device = torch::kCPU, bool bypass_w2 = false)
      : bypass_w2(bypass_w2) {
    w1 = register_module("w1", Linear(dim, hidden, true, device));
    w2 = register_module("w2", Linear(hidden, dim, true, device));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::gelu(titan::call(w1, x));
    return bypass_w2 ? w2->forward(h) : titan::call(w2, h);  // bypass_w2: the mistake titan::call catches
  }
  bool bypass_w2;
  Linear w1{nullptr}, w2{nullptr};
};
TORCH_MODULE(Mlp);

/// Trains the tiny GPT-2 under its plan and, on every rank, an unsharded copy; losses, gradients
/// and final (gathered) parameters must agree.
void check_gpt2_parity(bool sequence_parallel, bool loss_parallel) {
  INFO("sequence_parallel ", sequence_parallel, ", loss_parallel ", loss_parallel);
  const gpt2_test::Gpt2Args a;
  auto reference = gpt2_test::seeded_gpt2(a, device());
  auto model = gpt2_test::seeded_gpt2(a, device());
  titan::DeviceMesh mesh(titan_test::world(), {"tp"}, {tp_size()});
  titan::parallelize_module(model, mesh["tp"], gpt2_test::gpt2_plan(a, sequence_parallel, loss_parallel));
  // c_attn holds chunk r of each of q, k and v: its local rows are [q_r | k_r | v_r].
  const auto& c_attn = model->h[0]->as<gpt2_test::BlockImpl>()->attn->c_attn;
  CHECK(c_attn->weight.size(0) == 3 * a.dim / tp_size());
  const auto rows = a.dim / tp_size(), first = tp_group()->rank() * rows;
  const auto& ref_attn = reference->h[0]->as<gpt2_test::BlockImpl>()->attn->c_attn->weight;
  CHECK(torch::equal(c_attn->weight, torch::cat({ref_attn.narrow(0, first, rows), ref_attn.narrow(0, a.dim + first, rows),
                                                 ref_attn.narrow(0, 2 * a.dim + first, rows)})));

  // eps 1e-6 rather than 1e-8: the key bias's gradient is zero up to rounding (softmax ignores a
  // shift common to all keys), and AdamW would move it by ~lr in the noise's direction.
  auto options = torch::optim::AdamWOptions(1e-2).weight_decay(0.1).eps(1e-6);
  torch::optim::AdamW opt(model->parameters(), options), ref_opt(reference->parameters(), options);
  for (int64_t step = 0; step < 4; ++step) {
    auto [tokens, labels] = gpt2_test::lm_batch(a, step, device());
    auto ref_loss = torch::cross_entropy_loss(reference->forward(tokens).flatten(0, 1), labels.flatten());
    auto logits = titan::call(model, tokens);
    CHECK(logits.size(-1) == (loss_parallel ? a.vocab / tp_size() : a.vocab));
    auto loss = loss_parallel ? titan::loss_parallel_cross_entropy(logits, labels, tp_group())
                              : torch::cross_entropy_loss(logits.flatten(0, 1), labels.flatten());
    INFO("step ", step);
    check_step(*model, *reference, opt, ref_opt, loss, ref_loss, loss.item<double>());
  }
  check_parameters_match(*model, *reference, kAdamParamTol);
}

}  // namespace

TEST_CASE("tp: Colwise then Rowwise MLP (with biases) trains like the unsharded MLP") {
  for (bool gathered : {false, true}) {
    INFO("gathered intermediate: ", gathered);
    torch::manual_seed(3);
    Mlp reference(16, 24, device());
    torch::manual_seed(3);
    Mlp model(16, 24, device());
    titan::ParallelizePlan plan;
    if (gathered) {  // Colwise with a gathered output feeding Rowwise with a replicated input
      plan.add("w1", titan::ColwiseParallel().output_layout(titan::Replicate()))
          .add("w2", titan::RowwiseParallel().input_layout(titan::Replicate()));
    } else {
      plan.add("w1", titan::ColwiseParallel()).add("w2", titan::RowwiseParallel());
    }
    titan::parallelize_module(*model, tp_group(), plan);
    // Parameters are sharded in place: the member and the dictionary hold the same local tensor.
    CHECK(model->w1->weight.sizes() == torch::IntArrayRef({24 / tp_size(), 16}));
    CHECK(model->w1->weight.is_same(model->named_parameters()["w1.weight"]));
    CHECK(model->w1->bias.size(0) == 24 / tp_size());
    CHECK(model->w2->weight.sizes() == torch::IntArrayRef({16, 24 / tp_size()}));
    CHECK(model->w2->bias.size(0) == 16);  // replicated

    torch::optim::SGD opt(model->parameters(), 0.1), ref_opt(reference->parameters(), 0.1);
    for (int step = 0; step < 5; ++step) {
      // The same seed stream on every rank (the CPU's).
      auto x = torch::randn({4, 5, 16}).to(device()), target = torch::randn({4, 5, 16}).to(device());
      auto loss = F::mse_loss(titan::call(model, x), target);
      auto ref_loss = F::mse_loss(reference->forward(x), target);
      CHECK(std::abs(loss.item<double>() - ref_loss.item<double>()) < 1e-6);
      opt.zero_grad();
      ref_opt.zero_grad();
      loss.backward();
      ref_loss.backward();
      opt.step();
      ref_opt.step();
    }
    check_parameters_match(*model, *reference, 1e-6);
  }
}

TEST_CASE("tp: sharded parameters report their global layout") {
  torch::manual_seed(3);
  Mlp model(16, 24, device());
  titan::DeviceMesh mesh(titan_test::world(), {"tp"}, {tp_size()});
  titan::parallelize_module(*model, mesh["tp"],
                            titan::ParallelizePlan().add("w1", titan::ColwiseParallel()).add("w2", titan::RowwiseParallel()));
  const int r = tp_group()->rank();
  std::map<std::string, titan::ShardedTensor> by_name;
  for (auto& [name, tensor] : titan::sharded_parameters(*model)) by_name.emplace(name, tensor);
  const auto& w1 = by_name.at("w1.weight");
  CHECK((w1.layout.global_shape == std::vector<int64_t>{24, 16}));
  CHECK(w1.layout.placement() == "Shard(0)@tp");
  CHECK((w1.box().offsets == std::vector<int64_t>{r * 24 / tp_size(), 0}));
  const auto& w2 = by_name.at("w2.weight");
  CHECK(w2.layout.placement() == "Shard(1)@tp");
  CHECK((w2.box().offsets == std::vector<int64_t>{0, r * 24 / tp_size()}));
  CHECK(by_name.at("w1.bias").layout.placement() == "Shard(0)@tp");
  CHECK(by_name.at("w2.bias").layout.placement() == "Replicate");
  // The hooks are found on the modules they were attached to.
  CHECK(titan::find_hook<titan::ColwiseParallel>(*model->w1) != nullptr);
  CHECK(titan::find_hook<titan::RowwiseParallel>(*model->w2) != nullptr);
}

TEST_CASE("tp: vocabulary-parallel torch::nn::Embedding, all-reduced or sequence-sharded") {
  for (bool sequence : {false, true}) {
    INFO("output Shard(1): ", sequence);
    torch::manual_seed(5);
    torch::nn::Embedding reference(20, 6);
    torch::manual_seed(5);
    torch::nn::Embedding embedding(20, 6);
    reference->to(device());
    embedding->to(device());
    auto style = titan::RowwiseParallel().input_layout(titan::Replicate());
    if (sequence) style.output_layout(titan::Shard(1));
    titan::parallelize_module(*embedding, tp_group(), titan::ParallelizePlan().add("", style));
    CHECK(embedding->weight.size(0) == titan::chunk_sizes(20, tp_size())[static_cast<size_t>(tp_group()->rank())]);
    auto ids = torch::randint(20, {3, 8}).to(device());
    auto grad_out = torch::randn({3, 8, 6}).to(device());
    auto expected = reference->forward(ids);
    (expected * grad_out).sum().backward();
    auto out = titan::call(embedding, ids);
    auto mine = sequence ? titan::scatter_to_group(grad_out, tp_group(), 1) : grad_out;
    if (sequence) expected = titan::scatter_to_group(expected, tp_group(), 1);
    CHECK_CLOSE(out, expected, 1e-6);
    (out * mine).sum().backward();
    auto sharded = titan::sharded_parameters(*embedding);
    REQUIRE(sharded.size() == 1);
    titan::ShardedTensor grad{embedding->weight.grad(), sharded[0].second.layout, sharded[0].second.blocks};
    CHECK_CLOSE(titan::gather_full(grad), reference->weight.grad(), 1e-6);
  }
}

TEST_CASE("tp: redistribute Shard(1) -> Shard(2) is an all-to-all; its backward the inverse one") {
  torch::manual_seed(21);
  auto full = torch::randn({2, 7, 6}).to(device());  // uneven chunks at TP 4: 2, 2, 2, 1 and 2, 2, 2, 0
  auto grad_full = torch::randn({2, 7, 6}).to(device());
  auto shard = [](const torch::Tensor& t, int64_t dim) { return titan::scatter_to_group(t, tp_group(), dim); };
  auto local = shard(full, 1).detach().requires_grad_(true);
  auto out = titan::redistribute(local, titan::Shard(1), titan::Shard(2), tp_group());
  CHECK(torch::equal(out, shard(full, 2)));
  (out * shard(grad_full, 2)).sum().backward();  // the sum over ranks is (full * grad_full).sum()
  CHECK(torch::equal(local.grad(), shard(grad_full, 1)));
  // And back.
  CHECK(torch::equal(titan::redistribute(out.detach(), titan::Shard(-1), titan::Shard(1), tp_group()), local.detach()));
}

TEST_CASE("tp: PrepareModuleOutput moves a module's output between layouts, with the gradient") {
  for (bool to_shard : {true, false}) {
    INFO("Replicate() -> Shard(1): ", to_shard, " (else Shard(1) -> Replicate())");
    torch::manual_seed(3);
    torch::nn::Linear reference(4, 6);
    torch::manual_seed(3);
    torch::nn::Linear linear(4, 6);
    reference->to(device());
    linear->to(device());
    auto x = torch::randn({2, 8, 4}).to(device());
    auto grad_out = torch::randn({2, 8, 6}).to(device());
    const auto from = to_shard ? titan::Replicate() : titan::Shard(1);
    const auto to = to_shard ? titan::Shard(1) : titan::Replicate();
    titan::parallelize_module(*linear, tp_group(), titan::ParallelizePlan().add("",
        titan::PrepareModuleOutput().output_layout(from).desired_output_layout(to)));
    auto expected = reference->forward(x);  // [2, 8, 6]
    (expected * grad_out).sum().backward();

    // Shard(1) -> Replicate(): each rank runs the layer on its sequence chunk.
    auto out = titan::call(linear, to_shard ? x : titan::scatter_to_group(x, tp_group(), 1));
    auto shard = [](const torch::Tensor& t) { return titan::scatter_to_group(t, tp_group(), 1); };
    CHECK_CLOSE(out, to_shard ? shard(expected.detach()) : expected, 1e-6);
    (out * (to_shard ? shard(grad_out) : grad_out)).sum().backward();
    // Replicate() -> Shard(1): the backward all-gathers the chunks' gradients, so the layer's
    // gradient is whole on every rank; the other way each rank's covers its chunk: sum them.
    auto grad = linear->weight.grad();
    if (!to_shard) grad = titan::detail::all_reduce_raw(grad.clone(), *tp_group(), titan::ReduceOp::Sum);
    CHECK_CLOSE(grad, reference->weight.grad(), 1e-5);
  }
  CHECK_THROWS_WITH(titan::parallelize_module(
                        *torch::nn::Linear(2, 2), tp_group(),
                        titan::ParallelizePlan().add("", titan::PrepareModuleOutput().desired_output_layout(
                                                             titan::ReplicatePartialGrad()))),
                    doctest::Contains("Replicate() or Shard(d), got ReplicatePartialGrad()"));
}

TEST_CASE("tp: loss_parallel_cross_entropy matches cross_entropy on gathered logits, with its gradient") {
  const int64_t vocab = 4 * 5 + 2;  // uneven chunks at TP 4 (6, 6, 6, 4)
  auto full = (torch::randn({3, 7, vocab}) * 3).to(device());
  auto targets = torch::randint(vocab, {3, 7}).to(device());
  targets.index_put_({1, torch::indexing::Slice()}, -100);
  targets.index_put_({2, 0}, vocab - 1);
  auto leaf = full.clone().requires_grad_(true);
  auto expected = torch::cross_entropy_loss(leaf.flatten(0, 1), targets.flatten());
  expected.backward();

  auto local = titan::scatter_to_group(full, tp_group(), -1).detach().requires_grad_(true);
  auto loss = titan::loss_parallel_cross_entropy(local, targets, tp_group());
  CHECK(std::abs(loss.item<double>() - expected.item<double>()) < 1e-6);
  loss.backward();
  CHECK_CLOSE(titan::gather_from_group(local.grad(), tp_group(), -1), leaf.grad(), 1e-6);

  // Sum and None reductions, as cross_entropy's.
  for (int64_t reduction : {at::Reduction::Sum, at::Reduction::None}) {
    CAPTURE(reduction);
    auto expected_r = torch::cross_entropy_loss(full.flatten(0, 1), targets.flatten(), {}, reduction);
    auto loss_r = titan::loss_parallel_cross_entropy(local.detach(), targets, tp_group(), -100, reduction);
    CHECK_CLOSE(loss_r.reshape(expected_r.sizes()), expected_r, 1e-5);
  }

  // No valid target: NaN, as cross_entropy.
  auto none = torch::full({2, 3}, -100, torch::TensorOptions().dtype(torch::kLong).device(device()));
  CHECK(std::isnan(titan::loss_parallel_cross_entropy(local.detach().narrow(0, 0, 2).narrow(1, 0, 3), none,
                                                      tp_group())
                       .item<double>()));
}

TEST_CASE("tp: a GPT-2 written from scratch (fused qkv, biases, LayerNorm) matches the single-process run") {
  for (bool sp : {false, true})
    for (bool lp : {false, true}) check_gpt2_parity(sp, lp);
}

/// How many titan::exchange_sizes scopes (a size exchange) `observer` saw.
int64_t size_exchanges(const titan_test::OpEvents& observer) {
  int64_t n = 0;
  for (const auto& e : observer.events()) n += e.name == "titan::exchange_sizes";
  return n;
}

TEST_CASE("tp: a plan's hooks know their activations' shard sizes: no size exchange, also in AC recompute") {
  const gpt2_test::Gpt2Args a;
  auto reference = gpt2_test::seeded_gpt2(a, device());
  auto model = gpt2_test::seeded_gpt2(a, device());
  titan::DeviceMesh mesh(titan_test::world(), {"tp"}, {tp_size()});
  titan::parallelize_module(model, mesh["tp"], gpt2_test::gpt2_plan(a, /*sequence_parallel=*/true, /*loss_parallel=*/true));
  for (const auto& block : *model->h) titan::checkpoint_wrapper(*block);  // full AC: recomputed in backward
  // 7 positions: uneven chunks at TP 2 (4, 3) and at TP 4 (2, 2, 2, 1).
  auto generator = at::make_generator<at::CPUGeneratorImpl>(77);
  auto tokens = at::randint(a.vocab, {2, 7}, generator, torch::kLong).to(device());
  auto labels = at::randint(a.vocab, {2, 7}, generator, torch::kLong).to(device());
  auto ref_loss = torch::cross_entropy_loss(reference->forward(tokens).flatten(0, 1), labels.flatten());
  ref_loss.backward();
  for (int pass = 0; pass < 2; ++pass) {
    INFO("pass ", pass);
    model->zero_grad();
    titan_test::OpEvents exchanges;
    auto loss = titan::loss_parallel_cross_entropy(titan::call(model, tokens), labels, tp_group(), -100,
                                                   at::Reduction::Mean, a.vocab);
    loss.backward();
    CHECK(size_exchanges(exchanges) == 0);
    CHECK(loss.item<double>() == doctest::Approx(ref_loss.item<double>()).epsilon(1e-5));
    CHECK_CLOSE(model->ln_f->weight.grad(), reference->ln_f->weight.grad(), 1e-5);
  }
  // A vocabulary that does not match the logits is an error naming both.
  auto logits = titan::call(model, tokens);
  if (tp_size() > 1)
    CHECK_THROWS_WITH(titan::loss_parallel_cross_entropy(logits, labels, tp_group(), -100, at::Reduction::Mean, a.vocab + 3 * tp_size()),
                      doctest::Contains("vocabulary of"));
  // An activation the caller shards has no recorded extent: its sizes are exchanged, once.
  torch::nn::Linear linear(4, 6);
  linear->to(device());
  titan::parallelize_module(*linear, tp_group(), titan::ParallelizePlan().add("",
      titan::PrepareModuleInput().input_layouts({titan::Shard(1)}).desired_input_layouts({titan::Replicate()})));
  auto x = torch::randn({2, 7, 4}).to(device());
  titan_test::OpEvents exchanges;
  auto y = titan::call(linear, titan::scatter_to_group(x, tp_group(), 1));
  CHECK(size_exchanges(exchanges) == (tp_size() > 1 ? 1 : 0));
  CHECK_CLOSE(y, linear->forward(x), 1e-6);
}

TEST_CASE("tp: ColwiseParallel with fused_sizes splits each stacked part; its layout has a block per part") {
  torch::manual_seed(4);
  torch::nn::Linear reference(4, 4 + 8 + 12);  // three parts of unequal sizes: [4 | 8 | 12] rows
  torch::manual_seed(4);
  torch::nn::Linear fused(4, 4 + 8 + 12);
  reference->to(device());
  fused->to(device());
  const std::vector<int64_t> parts{4, 8, 12};
  titan::parallelize_module(fused, tp_group(), titan::ParallelizePlan().add(
      "", titan::ColwiseParallel().fused_sizes(parts).output_layout(titan::Replicate())));
  // Rank r's rows: chunk r of each part, in part order.
  std::vector<torch::Tensor> mine;
  int64_t start = 0;
  for (auto part : parts) {
    auto sizes = titan::chunk_sizes(part, tp_size());
    mine.push_back(reference->weight.narrow(0, start + titan::chunk_offset(sizes, tp_group()->rank()),
                                            sizes[static_cast<size_t>(tp_group()->rank())]));
    start += part;
  }
  CHECK(torch::equal(fused->weight, torch::cat(mine)));
  auto sharded = titan::sharded_parameters(fused);
  REQUIRE(sharded.size() == 2);
  const auto& weight = sharded[0].second;
  CHECK(weight.layout.placement() == "Shard(0)[3 parts]@tp");
  CHECK(weight.blocks.size() == (tp_size() == 1 ? 1u : 3u));  // one rectangle per part (merged at TP 1)
  // Gathered back (full_state_dict), the global weight and bias are the original ones.
  auto full = titan::full_state_dict(fused, tp_group(), titan::FullStateDictOptions().rank0_only(false));
  CHECK(same_values(full["weight"], reference->weight));
  CHECK(same_values(full["bias"], reference->bias));
  // The Replicate() output is [part 0 | part 1 | part 2], with the reference's gradients.
  auto x = torch::randn({3, 4}).to(device()), grad_out = torch::randn({3, 24}).to(device());
  auto out = titan::call(fused, x);
  CHECK_CLOSE(out, reference->forward(x), 1e-6);
  (out * grad_out).sum().backward();
  (reference->forward(x) * grad_out).sum().backward();
  check_gradients_match(*fused, *reference, 1e-6);
}

TEST_CASE("tp: fused_sizes errors name the sizes") {
  torch::nn::Linear other(4, 12);
  CHECK_THROWS_WITH(titan::parallelize_module(other, tp_group(),
                                              titan::ParallelizePlan().add("", titan::ColwiseParallel().fused_sizes({4, 4}))),
                    doctest::Contains("fused_sizes [4, 4] sum to 8 but the module has 12 output features"));
  if (tp_size() == 4) {
    torch::nn::Linear small(4, 2 + 10);
    CHECK_THROWS_WITH(titan::parallelize_module(small, tp_group(), titan::ParallelizePlan().add(
                                                    "", titan::ColwiseParallel().fused_sizes({2, 10}))),
                      doctest::Contains("a fused part of size 2) cannot give each of the 4 tensor-parallel ranks"));
  }
}

TEST_CASE("tp: RowwiseParallel adds the bias once, exactly, also in bf16") {
  // A zero weight leaves only the bias: the output must be it, bit for bit. Adding it on every
  // rank and subtracting N - 1 copies after the sum would round in bf16 (3 x (1 + 2^-7) is not a
  // bf16 number).
  torch::nn::Linear linear(8, 4);
  {
    torch::NoGradGuard no_grad;
    linear->weight.zero_();
    linear->bias.fill_(1.0 + 1.0 / 128);
  }
  linear->to(device(), torch::kBFloat16);
  titan::parallelize_module(linear, tp_group(),
                            titan::ParallelizePlan().add("", titan::RowwiseParallel().input_layout(titan::Replicate())));
  auto x = torch::randn({2, 8}).to(device(), torch::kBFloat16);
  auto out = titan::call(linear, x);
  CHECK(torch::equal(out, linear->bias.detach().expand({2, 4})));
  // The bias keeps its values and receives the whole gradient on every rank.
  CHECK(linear->bias.eq(1.0 + 1.0 / 128).all().item<bool>());
  out.sum().backward();
  CHECK(same_values(linear->bias.grad(), torch::full({4}, 2.0, torch::kBFloat16)));
}

TEST_CASE("tp: a model built on the meta device is sharded without allocating, then trained") {
  torch::manual_seed(3);
  Mlp reference(16, 24, device());
  Mlp model(16, 24, torch::kMeta);
  titan::parallelize_module(model, tp_group(),
                            titan::ParallelizePlan().add("w1", titan::ColwiseParallel()).add("w2", titan::RowwiseParallel()));
  for (const auto& p : model->parameters()) REQUIRE(p.is_meta());  // sharding allocated nothing
  CHECK(model->w1->weight.size(0) == titan::chunk_sizes(24, tp_size())[static_cast<size_t>(tp_group()->rank())]);
  titan::to_empty(*model, device());
  titan::load_full_state_dict(model, full_state(*reference));
  torch::optim::SGD opt(model->parameters(), 0.1), ref_opt(reference->parameters(), 0.1);
  for (int step = 0; step < 3; ++step) {
    // The same seed stream on every rank (the CPU's).
    auto x = torch::randn({4, 5, 16}).to(device()), target = torch::randn({4, 5, 16}).to(device());
    auto loss = F::mse_loss(titan::call(model, x), target);
    auto ref_loss = F::mse_loss(reference->forward(x), target);
    check_step(*model, *reference, opt, ref_opt, loss, ref_loss, loss.item<double>(), 1e-6);
  }
  check_parameters_match(*model, *reference, 1e-6);
}

TEST_CASE("tp: a tensor-parallel module called with ->forward is an error naming it") {
  torch::manual_seed(3);
  Mlp model(16, 24, device(), /*bypass_w2=*/true);
  titan::parallelize_module(model, tp_group(),
                            titan::ParallelizePlan().add("w1", titan::ColwiseParallel()).add("w2", titan::RowwiseParallel()));
  CHECK_THROWS_WITH(titan::call(model, torch::randn({2, 16}, device())),
                    doctest::Contains("'w2' has tensor-parallel rowwise attached but was not called through titan::call"));
}

TEST_CASE("tp: plain ColwiseParallel on a fused [q|k|v] projection computes wrong values; fused_sizes is right") {
  if (tp_size() == 1) return;
  const gpt2_test::Gpt2Args a;
  auto reference = gpt2_test::seeded_gpt2(a, device());
  auto [tokens, labels] = gpt2_test::lm_batch(a, 0, device());
  const double expected = torch::cross_entropy_loss(reference->forward(tokens).flatten(0, 1), labels.flatten()).item<double>();
  auto loss_with = [&](bool fused) {
    const auto full = gpt2_test::gpt2_plan(a, false, false);
    titan::ParallelizePlan plan;  // the GPT-2 plan, c_attn split whole (the trap) or part by part
    for (const auto& [pattern, style] : full.entries())
      if (pattern != "h.*.attn.c_attn" || fused) plan.add(pattern, style);
    if (!fused) plan.add("h.*.attn.c_attn", titan::ColwiseParallel().input_layout(titan::ReplicatePartialGrad()));
    auto model = gpt2_test::seeded_gpt2(a, device());
    titan::DeviceMesh mesh(titan_test::world(), {"tp"}, {tp_size()});
    titan::parallelize_module(model, mesh["tp"], plan);
    return torch::cross_entropy_loss(titan::call(model, tokens).flatten(0, 1), labels.flatten()).item<double>();
  };
  CHECK(std::abs(loss_with(true) - expected) < 1e-5);
  // Each rank's rows are a contiguous run of [q|k|v] (rank 0: all of q and half of k), which the
  // attention's chunk(3) reads as its q, k and v: no error is possible from the plan alone.
  CHECK(std::abs(loss_with(false) - expected) > 1e-4);
}

namespace {
/// A root that calls its vocabulary-parallel embedding with ->forward (the trap) and its head
/// through titan::call.
struct DirectEmbeddingImpl : torch::nn::Module {
  DirectEmbeddingImpl() {
    wte = register_module("wte", torch::nn::Embedding(16, 8));
    head = register_module("head", torch::nn::Linear(8, 16));
  }
  torch::Tensor forward(const torch::Tensor& tokens) { return titan::call(head, wte->forward(tokens)); }
  torch::nn::Embedding wte{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(DirectEmbedding);
}  // namespace

TEST_CASE("tp: an error from ATen inside the root's titan::call keeps its type and names the hooked modules not yet called") {
  if (tp_size() == 1) return;
  DirectEmbedding model;
  model->to(device());
  titan::parallelize_module(model, tp_group(),
                            titan::ParallelizePlan()
                                .add("wte", titan::RowwiseParallel().input_layout(titan::Replicate()))
                                .add("head", titan::ColwiseParallel().output_layout(titan::Replicate())));
  const auto tokens = torch::full({1, 4}, 15, torch::TensorOptions().dtype(torch::kLong).device(device()));
  const auto message = titan_test::error_of([&] { titan::call(model, tokens); });  // id 15 >= the local 16 / tp
  CHECK(message.find("index out of range") != std::string::npos);
  CHECK(message.find("where 'wte' has tensor-parallel rowwise attached; 'head' has tensor-parallel colwise attached "
                     "but were not called through titan::call before it") != std::string::npos);
  CHECK_THROWS_AS(titan::call(model, tokens), c10::IndexError);  // ATen's type is kept
}

TEST_CASE("tp: plan and style errors name what is wrong") {
  Mlp model(16, 24);
  CHECK_THROWS_WITH(titan::parallelize_module(model, tp_group(),
                                              titan::ParallelizePlan().add("layers.*.w1", titan::ColwiseParallel())),
                    doctest::Contains("plan entry 'layers.*.w1' matches no module"));
  // The hint shows the model's own names, not Llama's.
  CHECK_THROWS_WITH(titan::parallelize_module(model, tp_group(),
                                              titan::ParallelizePlan().add("mlp.w1", titan::ColwiseParallel())),
                    doctest::Contains("Its modules include 'w1', 'w2'"));
  CHECK_THROWS_WITH(titan::parallelize_module(model, tp_group(),
                                              titan::ParallelizePlan().add("w*", titan::ColwiseParallel()).add(
                                                  "w2", titan::RowwiseParallel())),
                    doctest::Contains("module 'w2' is matched by plan entries 'w*' and 'w2'"));
  Mlp fresh(16, 24);
  CHECK_THROWS_WITH(titan::parallelize_module(fresh, tp_group(), titan::ParallelizePlan().add("", titan::ColwiseParallel())),
                    doctest::Contains("does not know how to shard parameter 'w1.weight'"));
  CHECK_THROWS_WITH(titan::ColwiseParallel().output_layout(titan::Shard(1)).apply(*fresh->w1, "w1", tp_group(), "tp"),
                    doctest::Contains("output_layout must be Shard(-1) or Replicate()"));
  if (tp_size() > 1) {
    Linear tiny(4, 1, false);  // one output feature cannot be split
    CHECK_THROWS_WITH(titan::parallelize_module(tiny, tp_group(), titan::ParallelizePlan().add("", titan::ColwiseParallel())),
                      doctest::Contains("cannot give each of the"));
  }
  // Tensor parallelism after fully_shard: the order is named.
  Mlp sharded(16, 24, device());
  titan::fully_shard(sharded->w1, titan::DeviceMesh(titan_test::world(), {"dp_shard"}, {tp_size()}));
  CHECK_THROWS_WITH(titan::parallelize_module(sharded, tp_group(),
                                              titan::ParallelizePlan().add("w1", titan::ColwiseParallel())),
                    doctest::Contains("'w1' already has fully_shard attached. Apply tensor and expert parallelism first"));
}

