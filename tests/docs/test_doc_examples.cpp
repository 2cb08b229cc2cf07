// The docs' examples for a model written from scratch, compiled and run: docs/context_parallel.md
// ("The seam in model code": learned position embeddings indexed by the layout's positions) and
// docs/tensor_parallel.md ("A fused projection": ColwiseParallel with fused_sizes on c_attn). Each
// trains like the same model on one process; when a doc's snippet changes, this file changes
// with it.
#include "../support/multirank.hpp"
#include "../support/tp_test_util.hpp"

#include <titan/context_parallel.hpp>
#include <titan/fsdp.hpp>
#include <titan/mesh.hpp>
#include <titan/tensor_parallel.hpp>

namespace {

using titan_test::device;
using titan_test::world;
using torch::Tensor;

constexpr int64_t kVocab = 32, kDim = 16, kHeads = 4, kMaxSeq = 16;

/// The attention core: the module context parallelism replaces (q, k, v [B, H, S, hd] -> [B, H, S, hd]).
struct CoreImpl : torch::nn::Module {
  Tensor forward(const Tensor& q, const Tensor& k, const Tensor& v) {
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true);
  }
};
TORCH_MODULE(Core);

/// GPT-2 attention: one fused [q | k | v] projection, local head counts from the shapes.
struct AttentionImpl : torch::nn::Module {
  AttentionImpl() {
    c_attn = register_module("c_attn", torch::nn::Linear(kDim, 3 * kDim));  // rows [q | k | v]
    core = register_module("core", Core());
    c_proj = register_module("c_proj", torch::nn::Linear(kDim, kDim));
  }
  Tensor forward(const Tensor& x) {  // [B, S, dim] -> [B, S, dim]
    const int64_t batch = x.size(0), seq = x.size(1), head_dim = kDim / kHeads;
    auto qkv = titan::call(c_attn, x).chunk(3, -1);  // q, k, v: [B, S, dim (/ tp)]
    auto heads = [&](const Tensor& t) { return t.reshape({batch, seq, -1, head_dim}).transpose(1, 2); };
    auto y = titan::call(core, heads(qkv[0]), heads(qkv[1]), heads(qkv[2]));  // [B, heads (/ tp), S, hd]
    return titan::call(c_proj, y.transpose(1, 2).reshape({batch, seq, -1}));
  }
  torch::nn::Linear c_attn{nullptr}, c_proj{nullptr};
  Core core{nullptr};
};
TORCH_MODULE(Attention);

struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    ln = register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})));
    attn = register_module("attn", Attention());
  }
  Tensor forward(const Tensor& x) { return x + titan::call(attn, titan::call(ln, x)); }  // [B, S, dim]
  torch::nn::LayerNorm ln{nullptr};
  Attention attn{nullptr};
};
TORCH_MODULE(Block);

/// docs/context_parallel.md's model: token plus learned position embeddings, indexed by positions.
struct Gpt2Impl : torch::nn::Module {
  Gpt2Impl() {
    wte = register_module("wte", torch::nn::Embedding(kVocab, kDim));
    wpe = register_module("wpe", torch::nn::Embedding(kMaxSeq, kDim));
    h_ = register_module("h", torch::nn::ModuleList(Block(), Block()));
    ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})));
    lm_head = register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(kDim, kVocab).bias(false)));
  }
  Tensor forward(const Tensor& tokens, const Tensor& positions) {  // [B, S/cp], [S/cp]
    auto h = titan::call(wte, tokens) + titan::call(wpe, positions);  // [B, S/cp, dim]
    for (const auto& block : h_->children()) h = titan::call(block->as<BlockImpl>(), h);
    return titan::call(lm_head, titan::call(ln_f, h));  // [B, S/cp, vocab]
  }
  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
  torch::nn::ModuleList h_{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::Linear lm_head{nullptr};
};
TORCH_MODULE(Gpt2);

Gpt2 seeded() {
  torch::manual_seed(11);
  Gpt2 model;
  model->to(device());
  return model;
}

/// Tokens and labels of a batch of 2 sequences of `seq`, the same on every rank.
std::pair<Tensor, Tensor> batch_of(int64_t seq) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(21);
  auto tokens = torch::randint(kVocab, {2, seq}, gen, torch::kLong);
  auto labels = torch::randint(kVocab, {2, seq}, gen, torch::kLong);
  return {tokens.to(device()), labels.to(device())};
}

}  // namespace

TEST_CASE("docs/context_parallel.md: learned positions from the layout, CP x FSDP, train like one process") {
  if (world()->world_size() < 2) return;
  auto reference = seeded();
  auto model = seeded();
  const int64_t cp = world()->world_size(), seq = 4 * cp;
  auto [tokens, labels] = batch_of(seq);
  const auto whole = torch::cross_entropy_loss(
      reference->forward(tokens, torch::arange(seq, tokens.options())).flatten(0, 1), labels.flatten());
  whole.backward();

  // The doc's snippet, with FSDP over the cp ranks (their gradients must be summed).
  titan::DeviceMesh mesh(world(), {"cp"}, {cp});
  titan::apply_context_parallel(*model, "h.*.attn.core", mesh.group("cp"));
  for (const auto& block : model->h_->children()) titan::fully_shard(*block, mesh["cp"]);
  titan::fully_shard(model, mesh["cp"]);
  const titan::ContextParallelLayout layout(cp, mesh.coordinate("cp"));
  auto local_tokens = layout.shard(tokens, 1), local_labels = layout.shard(labels, 1);  // [B, S/cp]
  auto positions = layout.positions(seq, local_tokens.options());                      // [S/cp]
  // Each rank's token sum over the whole batch's token count, times cp (FSDP averages over cp).
  auto loss = torch::cross_entropy_loss(titan::call(model, local_tokens, positions).flatten(0, 1),
                                        local_labels.flatten(), {}, at::Reduction::Sum) *
              (static_cast<double>(cp) / static_cast<double>(labels.numel()));
  loss.backward();
  CHECK(std::abs(titan::dist_sum(loss.item<double>(), world()->group()) / static_cast<double>(cp) -
                 whole.item<double>()) < 1e-5);
  tp_test::check_gradients_match(*model, *reference, 1e-5);
}

TEST_CASE("docs/tensor_parallel.md: ColwiseParallel with fused_sizes on c_attn computes the model's values") {
  if (world()->world_size() < 2) return;
  auto reference = seeded();
  auto model = seeded();
  const int64_t dim = kDim;
  // The doc's plan (the attention only: the rest of the model stays replicated).
  titan::ParallelizePlan plan;
  plan.add("h.*.attn", titan::PrepareModuleInput().input_layouts({titan::Replicate()})
                           .desired_input_layouts({titan::ReplicatePartialGrad()}))
      .add("h.*.attn.c_attn", titan::ColwiseParallel().input_layout(titan::ReplicatePartialGrad())
                                  .fused_sizes({dim, dim, dim}))           // q, k, v rows
      .add("h.*.attn.c_proj", titan::RowwiseParallel());
  titan::DeviceMesh mesh(world(), {"tp"}, {world()->world_size()});  // 2 or 4 ranks: whole heads each
  titan::parallelize_module(model, mesh["tp"], plan);
  auto [tokens, labels] = batch_of(8);
  const auto positions = torch::arange(8, tokens.options());
  auto expected = torch::cross_entropy_loss(reference->forward(tokens, positions).flatten(0, 1), labels.flatten());
  auto loss = torch::cross_entropy_loss(titan::call(model, tokens, positions).flatten(0, 1), labels.flatten());
  CHECK(std::abs(loss.item<double>() - expected.item<double>()) < 1e-5);
  expected.backward();
  loss.backward();
  tp_test::check_gradients_match(*model, *reference, 1e-5);
}
