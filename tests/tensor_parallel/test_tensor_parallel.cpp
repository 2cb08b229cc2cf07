// titan/tensor_parallel.hpp: every style, the Llama plan and loss parallel match a single-process
// run of the same model (same weights, same inputs) at TP = world size (1, 2 or 4 ranks).
#include "tiny_llama.hpp"
#include "tp_test_util.hpp"

#include <titan/meta.hpp>
#include <titan/tensor_parallel.hpp>

#include <cmath>

namespace {

using namespace tp_test;  // the tiny models and the gather/compare helpers

/// Two linear layers with biases: x -> w2(gelu(w1(x))).
struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t dim, int64_t hidden) {
    w1 = register_module("w1", Linear(dim, hidden, true));
    w2 = register_module("w2", Linear(hidden, dim, true));
  }
  torch::Tensor forward(const torch::Tensor& x) { return titan::call(w2, torch::gelu(titan::call(w1, x))); }
  Linear w1{nullptr}, w2{nullptr};
};
TORCH_MODULE(Mlp);

/// Copies each parameter's local block out of the reference's full parameter (for meta-built models).
void load_shards_from(torch::nn::Module& parallel, const torch::nn::Module& reference) {
  torch::NoGradGuard no_grad;
  auto full = reference.named_parameters();
  for (auto& [name, tensor] : titan::sharded_parameters(parallel)) {
    auto block = full[name];
    for (size_t d = 0; d < tensor.box.sizes.size(); ++d)
      block = block.narrow(static_cast<int64_t>(d), tensor.box.offsets[d], tensor.box.sizes[d]);
    tensor.local.copy_(block);
  }
  auto buffers = reference.named_buffers();
  for (auto& item : parallel.named_buffers()) item.value().copy_(buffers[item.key()]);
}

/// Same tokens and labels on every rank: [batch, seq] with some ignored (-100) labels.
std::pair<torch::Tensor, torch::Tensor> lm_batch(const TinyArgs& a, int64_t step) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(1000 + step);
  auto tokens = at::randint(a.vocab, {2, 8}, generator, torch::kLong);
  auto labels = at::randint(a.vocab, {2, 8}, generator, torch::kLong);
  labels.index_put_({0, torch::indexing::Slice(0, 3)}, -100);
  return {tokens, labels};
}

struct LlamaRun {
  bool sequence_parallel = false, loss_parallel = false, meta = false;
};

/// Trains the tiny Llama with the example plan and, on every rank, an unsharded copy; losses and
/// final (gathered) parameters must agree.
void check_llama_parity(const LlamaRun& run) {
  TinyArgs a;
  torch::manual_seed(7);
  TinyLlama reference(a);
  TinyLlama model(nullptr);
  if (run.meta) {
    model = TinyLlama(a, torch::kMeta);
  } else {
    torch::manual_seed(7);  // the same weights as the reference
    model = TinyLlama(a);
  }
  auto plan = titan::examples::llama_tp_plan(
      dims_of(a), tp_size(),
      titan::examples::TpPlanOptions().sequence_parallel(run.sequence_parallel).loss_parallel(run.loss_parallel));
  titan::DeviceMesh mesh(titan_test::world(), {"tp"}, {tp_size()});
  titan::parallelize_module(*model, mesh["tp"], plan);
  if (run.meta) {
    for (const auto& p : model->parameters()) REQUIRE(p.is_meta());  // sharding allocated nothing
    titan::to_empty(*model, torch::kCPU);
    load_shards_from(*model, *reference);
  }
  // Local shapes: whole heads per rank.
  auto wq = model->named_parameters()["layers.0.attention.wq.weight"];
  CHECK(wq.size(0) == a.dim / tp_size());
  CHECK(model->named_parameters()["layers.0.attention.wk.weight"].size(0) == a.n_kv_heads * a.head_dim() / tp_size());

  auto options = torch::optim::AdamWOptions(1e-2).weight_decay(0.1);
  torch::optim::AdamW opt(model->parameters(), options), ref_opt(reference->parameters(), options);
  for (int64_t step = 0; step < 5; ++step) {
    auto [tokens, labels] = lm_batch(a, step);
    auto ref_logits = reference->forward(tokens);
    auto ref_loss = torch::cross_entropy_loss(ref_logits.flatten(0, 1), labels.flatten());
    auto logits = titan::call(model, tokens);
    torch::Tensor loss;
    if (run.loss_parallel) {
      CHECK(logits.size(-1) == a.vocab / tp_size());
      loss = titan::loss_parallel_cross_entropy(logits, labels, tp_group());
    } else {
      CHECK(logits.size(-1) == a.vocab);
      loss = torch::cross_entropy_loss(logits.flatten(0, 1), labels.flatten());
    }
    INFO("step ", step);
    tp_test::check_step(*model, *reference, opt, ref_opt, loss, ref_loss, loss.item<double>());
  }
  check_parameters_match(*model, *reference, tp_test::kAdamParamTol);
}

}  // namespace

TEST_CASE("tp: Colwise then Rowwise MLP (with biases) trains like the unsharded MLP") {
  for (bool gathered : {false, true}) {
    INFO("gathered intermediate: ", gathered);
    torch::manual_seed(3);
    Mlp reference(16, 24);
    torch::manual_seed(3);
    Mlp model(16, 24);
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
      auto x = torch::randn({4, 5, 16}), target = torch::randn({4, 5, 16});  // same seed stream on every rank
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
  Mlp model(16, 24);
  titan::DeviceMesh mesh(titan_test::world(), {"tp"}, {tp_size()});
  titan::parallelize_module(*model, mesh["tp"],
                            titan::ParallelizePlan().add("w1", titan::ColwiseParallel()).add("w2", titan::RowwiseParallel()));
  const int r = tp_group()->rank();
  std::map<std::string, titan::ShardedTensor> by_name;
  for (auto& [name, tensor] : titan::sharded_parameters(*model)) by_name.emplace(name, tensor);
  const auto& w1 = by_name.at("w1.weight");
  CHECK((w1.layout.global_shape == std::vector<int64_t>{24, 16}));
  CHECK(w1.layout.placement() == "Shard(0)@tp");
  CHECK((w1.box.offsets == std::vector<int64_t>{r * 24 / tp_size(), 0}));
  const auto& w2 = by_name.at("w2.weight");
  CHECK(w2.layout.placement() == "Shard(1)@tp");
  CHECK((w2.box.offsets == std::vector<int64_t>{0, r * 24 / tp_size()}));
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
    auto style = titan::RowwiseParallel().input_layout(titan::Replicate());
    if (sequence) style.output_layout(titan::Shard(1));
    titan::parallelize_module(*embedding, tp_group(), titan::ParallelizePlan().add("", style));
    CHECK(embedding->weight.size(0) == titan::chunk_sizes(20, tp_size())[static_cast<size_t>(tp_group()->rank())]);
    auto ids = torch::randint(20, {3, 8});
    auto grad_out = torch::randn({3, 8, 6});
    auto expected = reference->forward(ids);
    (expected * grad_out).sum().backward();
    auto out = titan::call(embedding, ids);
    auto mine = sequence ? titan::tp::scatter_to_group(grad_out, tp_group(), 1) : grad_out;
    if (sequence) expected = titan::tp::scatter_to_group(expected, tp_group(), 1);
    CHECK_CLOSE(out, expected, 1e-6);
    (out * mine).sum().backward();
    auto sharded = titan::sharded_parameters(*embedding);
    REQUIRE(sharded.size() == 1);
    titan::ShardedTensor grad{embedding->weight.grad(), sharded[0].second.layout, sharded[0].second.box};
    CHECK_CLOSE(tp_test::gather_global(grad), reference->weight.grad(), 1e-6);
  }
}

TEST_CASE("tp: redistribute Shard(1) -> Shard(2) is an all-to-all; its backward the inverse one") {
  torch::manual_seed(21);
  auto full = torch::randn({2, 7, 6});  // uneven chunks at TP 4: 2, 2, 2, 1 and 2, 2, 2, 0
  auto grad_full = torch::randn({2, 7, 6});
  auto shard = [](const torch::Tensor& t, int64_t dim) { return titan::tp::scatter_to_group(t, tp_group(), dim); };
  auto local = shard(full, 1).detach().requires_grad_(true);
  auto out = titan::tp::redistribute(local, titan::Shard(1), titan::Shard(2), tp_group());
  CHECK(torch::equal(out, shard(full, 2)));
  (out * shard(grad_full, 2)).sum().backward();  // the sum over ranks is (full * grad_full).sum()
  CHECK(torch::equal(local.grad(), shard(grad_full, 1)));
  // And back.
  CHECK(torch::equal(titan::tp::redistribute(out.detach(), titan::Shard(-1), titan::Shard(1), tp_group()), local.detach()));
}

TEST_CASE("tp: PrepareModuleOutput moves a module's output between layouts, with the gradient") {
  for (bool to_shard : {true, false}) {
    INFO("Replicate() -> Shard(1): ", to_shard, " (else Shard(1) -> Replicate())");
    torch::manual_seed(3);
    torch::nn::Linear reference(4, 6);
    torch::manual_seed(3);
    torch::nn::Linear linear(4, 6);
    auto x = torch::randn({2, 8, 4});
    auto grad_out = torch::randn({2, 8, 6});
    const auto from = to_shard ? titan::Replicate() : titan::Shard(1);
    const auto to = to_shard ? titan::Shard(1) : titan::Replicate();
    titan::parallelize_module(*linear, tp_group(), titan::ParallelizePlan().add("",
        titan::PrepareModuleOutput().output_layout(from).desired_output_layout(to)));
    auto expected = reference->forward(x);  // [2, 8, 6]
    (expected * grad_out).sum().backward();

    // Shard(1) -> Replicate(): each rank runs the layer on its sequence chunk.
    auto out = titan::call(linear, to_shard ? x : titan::tp::scatter_to_group(x, tp_group(), 1));
    auto shard = [](const torch::Tensor& t) { return titan::tp::scatter_to_group(t, tp_group(), 1); };
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
  auto full = torch::randn({3, 7, vocab}) * 3;
  auto targets = torch::randint(vocab, {3, 7});
  targets.index_put_({1, torch::indexing::Slice()}, -100);
  targets.index_put_({2, 0}, vocab - 1);
  auto leaf = full.clone().requires_grad_(true);
  auto expected = torch::cross_entropy_loss(leaf.flatten(0, 1), targets.flatten());
  expected.backward();

  auto local = titan::tp::scatter_to_group(full, tp_group(), -1).detach().requires_grad_(true);
  auto loss = titan::loss_parallel_cross_entropy(local, targets, tp_group());
  CHECK(std::abs(loss.item<double>() - expected.item<double>()) < 1e-6);
  loss.backward();
  CHECK_CLOSE(titan::tp::gather_from_group(local.grad(), tp_group(), -1), leaf.grad(), 1e-6);

  // Sum and None reductions, as cross_entropy's.
  for (int64_t reduction : {at::Reduction::Sum, at::Reduction::None}) {
    CAPTURE(reduction);
    auto expected_r = torch::cross_entropy_loss(full.flatten(0, 1), targets.flatten(), {}, reduction);
    auto loss_r = titan::loss_parallel_cross_entropy(local.detach(), targets, tp_group(), -100, reduction);
    CHECK_CLOSE(loss_r.reshape(expected_r.sizes()), expected_r, 1e-5);
  }

  // No valid target: NaN, as cross_entropy.
  auto none = torch::full({2, 3}, -100, torch::kLong);
  CHECK(std::isnan(titan::loss_parallel_cross_entropy(local.detach().narrow(0, 0, 2).narrow(1, 0, 3), none,
                                                      tp_group())
                       .item<double>()));
}

TEST_CASE("tp: Llama plan on a tiny Llama matches the single-process run") {
  for (bool sp : {false, true}) {
    for (bool lp : {false, true}) {
      INFO("sequence_parallel ", sp, ", loss_parallel ", lp);
      check_llama_parity(LlamaRun{sp, lp, false});
    }
  }
}

TEST_CASE("tp: a model built on the meta device is sharded without allocating, then trained") {
  check_llama_parity(LlamaRun{true, true, true});
}

TEST_CASE("tp: plan and style errors name what is wrong") {
  TinyArgs a;
  auto bad = dims_of(a).n_kv_heads(6);
  CHECK_THROWS_WITH(titan::examples::llama_tp_plan(bad, 4),
                    doctest::Contains("n_kv_heads=6 is not divisible by 4"));
  CHECK_THROWS_WITH(titan::examples::llama_tp_plan(dims_of(a).vocab_size(50), 4),
                    doctest::Contains("vocab_size=50 is not divisible by 4"));
  CHECK_THROWS_WITH(titan::examples::llama_tp_plan(dims_of(a).hidden_dim(66), 4),
                    doctest::Contains("hidden_dim=66 is not divisible by 4"));

  Mlp model(16, 24);
  CHECK_THROWS_WITH(titan::parallelize_module(*model, tp_group(),
                                              titan::ParallelizePlan().add("layers.*.w1", titan::ColwiseParallel())),
                    doctest::Contains("plan entry 'layers.*.w1' matches no module"));
  CHECK_THROWS_WITH(titan::parallelize_module(*model, tp_group(),
                                              titan::ParallelizePlan().add("w*", titan::ColwiseParallel()).add(
                                                  "w2", titan::RowwiseParallel())),
                    doctest::Contains("module 'w2' is matched by plan entries 'w*' and 'w2'"));
  Mlp fresh(16, 24);
  CHECK_THROWS_WITH(titan::parallelize_module(*fresh, tp_group(), titan::ParallelizePlan().add("", titan::ColwiseParallel())),
                    doctest::Contains("does not know how to shard parameter 'w1.weight'"));
  CHECK_THROWS_WITH(titan::ColwiseParallel().output_layout(titan::Shard(1)).apply(*fresh->w1, "w1", tp_group(), "tp"),
                    doctest::Contains("output_layout must be Shard(-1) or Replicate()"));
  if (tp_size() > 1) {
    Linear tiny(4, 1, false);  // one output feature cannot be split
    CHECK_THROWS_WITH(titan::parallelize_module(*tiny, tp_group(), titan::ParallelizePlan().add("", titan::ColwiseParallel())),
                      doctest::Contains("cannot give each of the"));
  }
}

TEST_CASE("tp: plan patterns match one name component per '*'") {
  using titan::detail::match_module_name;
  CHECK(match_module_name("layers.*.attention.wq", "layers.0.attention.wq"));
  CHECK(match_module_name("layers.*.attention.wq", "layers.11.attention.wq"));
  CHECK_FALSE(match_module_name("layers.*.attention.wq", "layers.0.attention.wk"));
  CHECK_FALSE(match_module_name("layers.*", "layers.0.attention"));
  CHECK(match_module_name("layers.*.feed_forward.w*", "layers.3.feed_forward.w13"));
  CHECK(match_module_name("", ""));
  CHECK_FALSE(match_module_name("", "output"));
}
