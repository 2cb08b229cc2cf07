#pragma once
// A tiny GPT-2 written the way a new user writes a model from scratch in plain LibTorch, following
// only titan's docs: library modules (Embedding, LayerNorm, Linear, all with biases), learned
// positions, a fused [q|k|v] projection (c_attn) and GELU MLP, every submodule called through
// titan::call. Its tensor-parallel plan is the user's too. The library tests train it under TP,
// FSDP and FSDP x TP against the same model on one process.
#include <titan/tensor_parallel.hpp>
#include <torch/torch.h>

namespace gpt2_test {

/// The sizes of the tiny GPT-2.
struct Gpt2Args {
  int64_t vocab = 64, dim = 32, n_heads = 4, n_layers = 2, max_seq = 16;
  int64_t head_dim() const { return dim / n_heads; }
};

/// Causal self-attention with a fused [q|k|v] projection; head counts come from the local shapes.
struct AttentionImpl : torch::nn::Module {
  explicit AttentionImpl(const Gpt2Args& a) : head_dim(a.head_dim()) {
    c_attn = register_module("c_attn", torch::nn::Linear(a.dim, 3 * a.dim));  // rows [q | k | v]
    c_proj = register_module("c_proj", torch::nn::Linear(a.dim, a.dim));
  }
  torch::Tensor forward(const torch::Tensor& x) {  // x [B, S, dim] -> [B, S, dim]
    const int64_t batch = x.size(0), seq = x.size(1);
    auto qkv = titan::call(c_attn, x).chunk(3, -1);  // q, k, v: [B, S, dim (/ tp)]
    auto heads = [&](const torch::Tensor& t) { return t.reshape({batch, seq, -1, head_dim}).transpose(1, 2); };
    auto y = at::scaled_dot_product_attention(heads(qkv[0]), heads(qkv[1]), heads(qkv[2]), {}, 0.0,
                                              /*is_causal=*/true);  // [B, heads (/ tp), S, head_dim]
    return titan::call(c_proj, y.transpose(1, 2).reshape({batch, seq, -1}));
  }
  int64_t head_dim;
  torch::nn::Linear c_attn{nullptr}, c_proj{nullptr};
};
TORCH_MODULE(Attention);

struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(const Gpt2Args& a) {
    c_fc = register_module("c_fc", torch::nn::Linear(a.dim, 4 * a.dim));
    c_proj = register_module("c_proj", torch::nn::Linear(4 * a.dim, a.dim));
  }
  torch::Tensor forward(const torch::Tensor& x) {  // [B, S, dim] -> [B, S, dim]
    return titan::call(c_proj, torch::gelu(titan::call(c_fc, x), "tanh"));
  }
  torch::nn::Linear c_fc{nullptr}, c_proj{nullptr};
};
TORCH_MODULE(Mlp);

struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(const Gpt2Args& a) {
    ln_1 = register_module("ln_1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({a.dim})));
    attn = register_module("attn", Attention(a));
    ln_2 = register_module("ln_2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({a.dim})));
    mlp = register_module("mlp", Mlp(a));
  }
  torch::Tensor forward(const torch::Tensor& x) {  // [B, S, dim] -> [B, S, dim]
    auto h = x + titan::call(attn, titan::call(ln_1, x));
    return h + titan::call(mlp, titan::call(ln_2, h));
  }
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  Attention attn{nullptr};
  Mlp mlp{nullptr};
};
TORCH_MODULE(Block);

/// Token plus learned position embeddings.
struct EmbeddingsImpl : torch::nn::Module {
  explicit EmbeddingsImpl(const Gpt2Args& a) {
    wte = register_module("wte", torch::nn::Embedding(a.vocab, a.dim));
    wpe = register_module("wpe", torch::nn::Embedding(a.max_seq, a.dim));
  }
  torch::Tensor forward(const torch::Tensor& tokens) {  // [B, S] -> [B, S, dim]
    auto positions = torch::arange(tokens.size(1), tokens.options());
    return titan::call(wte, tokens) + titan::call(wpe, positions);
  }
  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
};
TORCH_MODULE(Embeddings);

struct Gpt2Impl : torch::nn::Module {
  explicit Gpt2Impl(const Gpt2Args& a) {
    embeddings = register_module("embeddings", Embeddings(a));
    h = register_module("h", torch::nn::ModuleList());
    for (int64_t i = 0; i < a.n_layers; ++i) h->push_back(Block(a));
    ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({a.dim})));
    lm_head = register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(a.dim, a.vocab).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& tokens) {  // [B, S] -> logits [B, S, vocab (/ tp)]
    auto x = titan::call(embeddings, tokens);
    for (const auto& block : *h) x = titan::call(block->as<BlockImpl>(), x);
    return titan::call(lm_head, titan::call(ln_f, x));
  }
  Embeddings embeddings{nullptr};
  torch::nn::ModuleList h{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::Linear lm_head{nullptr};
};
TORCH_MODULE(Gpt2);

/// A GPT-2 with the weights of `seed` (drawn on the CPU: the same on any device), on `device`.
inline Gpt2 seeded_gpt2(const Gpt2Args& a, c10::Device device, uint64_t seed = 3) {
  torch::manual_seed(seed);
  Gpt2 model(a);
  model->to(device);
  return model;
}

/// The GPT-2 tensor-parallel plan. With sequence parallel, the residual stream between blocks is
/// Shard(1) and the LayerNorms run on sequence chunks; c_attn is split part by part (fused_sizes).
inline titan::ParallelizePlan gpt2_plan(const Gpt2Args& a, bool sequence_parallel, bool loss_parallel) {
  using titan::Replicate;
  using titan::Shard;
  const titan::Placement stream = sequence_parallel ? Shard(1) : Replicate();
  auto block_input = titan::PrepareModuleInput().input_layouts({stream}).desired_input_layouts(
      {titan::ReplicatePartialGrad()});
  const auto consumer = titan::ColwiseParallel().input_layout(titan::ReplicatePartialGrad());
  titan::ParallelizePlan plan;
  plan.add("embeddings.wte", titan::RowwiseParallel().input_layout(Replicate()).output_layout(Replicate()))
      .add("embeddings", titan::PrepareModuleOutput().output_layout(Replicate()).desired_output_layout(stream))
      .add("h.*.attn", block_input)
      .add("h.*.attn.c_attn", titan::ColwiseParallel(consumer).fused_sizes({a.dim, a.dim, a.dim}))
      .add("h.*.attn.c_proj", titan::RowwiseParallel().output_layout(stream))
      .add("h.*.mlp", block_input)
      .add("h.*.mlp.c_fc", consumer)
      .add("h.*.mlp.c_proj", titan::RowwiseParallel().output_layout(stream))
      .add("lm_head", titan::ColwiseParallel().input_layout(stream).output_layout(loss_parallel ? Shard(-1) : Replicate()));
  if (sequence_parallel) {
    plan.add("h.*.ln_1", titan::SequenceParallel()).add("h.*.ln_2", titan::SequenceParallel()).add("ln_f",
                                                                                                  titan::SequenceParallel());
  }
  return plan;
}

/// Same tokens and labels on every rank, on `device`: [batch, seq] with some ignored (-100) labels.
inline std::pair<torch::Tensor, torch::Tensor> lm_batch(const Gpt2Args& a, int64_t step, c10::Device device,
                                                        int64_t batch = 4) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(1000 + step);
  auto tokens = at::randint(a.vocab, {batch, 8}, generator, torch::kLong);
  auto labels = at::randint(a.vocab, {batch, 8}, generator, torch::kLong);
  labels.index_put_({0, torch::indexing::Slice(0, 3)}, -100);
  return {tokens.to(device), labels.to(device)};
}

}  // namespace gpt2_test
