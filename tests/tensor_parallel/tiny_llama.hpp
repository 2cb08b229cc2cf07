#pragma once
// A tiny Llama-like Transformer with torchtitan's module names (tok_embeddings, layers.N.attention.wq,
// ..., norm, output), written as plain user code calling its submodules through titan::call, for
// the tensor-parallel tests. It can be built on the meta device.
#include "../../examples/parallelize/llama_tp_plan.hpp"

#include <titan/hooks.hpp>
#include <torch/torch.h>

#include <cmath>

namespace tp_test {

namespace F = torch::nn::functional;

inline torch::TensorOptions on(torch::Device device) { return torch::TensorOptions().device(device); }

/// A linear layer written like user code: weight [out, in], optional bias [out].
struct LinearImpl : torch::nn::Module {
  LinearImpl(int64_t in, int64_t out, bool with_bias, torch::Device device = torch::kCPU) {
    weight = register_parameter("weight", torch::randn({out, in}, on(device)) / std::sqrt(double(in)));
    if (with_bias) bias = register_parameter("bias", torch::randn({out}, on(device)) * 0.1);
  }
  torch::Tensor forward(const torch::Tensor& x) { return F::linear(x, weight, bias); }
  torch::Tensor weight, bias;
};
TORCH_MODULE(Linear);

/// An embedding table that can be built on the meta device (torch::nn::Embedding cannot).
struct TableImpl : torch::nn::Module {
  TableImpl(int64_t vocab, int64_t dim, torch::Device device) {
    weight = register_parameter("weight", torch::randn({vocab, dim}, on(device)));
  }
  torch::Tensor forward(const torch::Tensor& ids) { return F::embedding(ids, weight); }
  torch::Tensor weight;
};
TORCH_MODULE(Table);

struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, torch::Device device) {
    weight = register_parameter("weight", 1 + 0.1 * torch::randn({dim}, on(device)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * weight;
  }
  torch::Tensor weight;
};
TORCH_MODULE(RMSNorm);

/// The sizes of the tiny Llama-like model below.
struct TinyArgs {
  int64_t vocab = 64, dim = 32, n_heads = 8, n_kv_heads = 4, hidden = 64, n_layers = 2, max_seq = 16;
  int64_t head_dim() const { return dim / n_heads; }
};

/// Grouped-query causal attention; local head counts come from the (possibly sharded) shapes.
struct AttentionImpl : torch::nn::Module {
  AttentionImpl(const TinyArgs& a, torch::Device device) : head_dim(a.head_dim()) {
    wq = register_module("wq", Linear(a.dim, a.n_heads * head_dim, false, device));
    wk = register_module("wk", Linear(a.dim, a.n_kv_heads * head_dim, false, device));
    wv = register_module("wv", Linear(a.dim, a.n_kv_heads * head_dim, false, device));
    wo = register_module("wo", Linear(a.n_heads * head_dim, a.dim, false, device));
  }
  /// x [b, s, dim], pos_q / pos_k [s, head_dim] (positional signals added to queries and keys; two
  /// extra tensor arguments like the example model's rope_cos / rope_sin).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& pos_q, const torch::Tensor& pos_k) {
    const int64_t b = x.size(0), s = x.size(1);
    auto q = titan::call(wq, x).view({b, s, -1, head_dim}) + pos_q.view({1, s, 1, head_dim});  // [b, s, heads, hd]
    auto k = titan::call(wk, x).view({b, s, -1, head_dim}) + pos_k.view({1, s, 1, head_dim});  // [b, s, kv_heads, hd]
    auto v = titan::call(wv, x).view({b, s, -1, head_dim});
    const int64_t rep = q.size(2) / k.size(2);
    k = k.repeat_interleave(rep, 2);
    v = v.repeat_interleave(rep, 2);
    auto o = at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), {}, 0.0,
                                              /*is_causal=*/true);  // [b, heads, s, hd]
    return titan::call(wo, o.transpose(1, 2).reshape({b, s, -1}));
  }
  int64_t head_dim;
  Linear wq{nullptr}, wk{nullptr}, wv{nullptr}, wo{nullptr};
};
TORCH_MODULE(Attention);

struct FeedForwardImpl : torch::nn::Module {
  FeedForwardImpl(const TinyArgs& a, torch::Device device) {
    w1 = register_module("w1", Linear(a.dim, a.hidden, false, device));
    w2 = register_module("w2", Linear(a.hidden, a.dim, false, device));
    w3 = register_module("w3", Linear(a.dim, a.hidden, false, device));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return titan::call(w2, torch::silu(titan::call(w1, x)) * titan::call(w3, x));
  }
  Linear w1{nullptr}, w2{nullptr}, w3{nullptr};
};
TORCH_MODULE(FeedForward);

struct BlockImpl : torch::nn::Module {
  BlockImpl(const TinyArgs& a, torch::Device device) {
    attention_norm = register_module("attention_norm", RMSNorm(a.dim, device));
    attention = register_module("attention", Attention(a, device));
    ffn_norm = register_module("ffn_norm", RMSNorm(a.dim, device));
    feed_forward = register_module("feed_forward", FeedForward(a, device));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& pos_q, const torch::Tensor& pos_k) {
    auto h = x + titan::call(attention, titan::call(attention_norm, x), pos_q, pos_k);
    return h + titan::call(feed_forward, titan::call(ffn_norm, h));
  }
  RMSNorm attention_norm{nullptr}, ffn_norm{nullptr};
  Attention attention{nullptr};
  FeedForward feed_forward{nullptr};
};
TORCH_MODULE(Block);

/// A tiny Llama-like Transformer with torchtitan's module names.
struct TinyLlamaImpl : torch::nn::Module {
  TinyLlamaImpl(const TinyArgs& a, torch::Device device = torch::kCPU) {
    tok_embeddings = register_module("tok_embeddings", Table(a.vocab, a.dim, device));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < a.n_layers; ++i) layers->push_back(Block(a, device));
    norm = register_module("norm", RMSNorm(a.dim, device));
    output = register_module("output", Linear(a.dim, a.vocab, false, device));
    pos_q = register_buffer("pos_q", 0.1 * torch::randn({a.max_seq, a.head_dim()}, on(device)));
    pos_k = register_buffer("pos_k", 0.1 * torch::randn({a.max_seq, a.head_dim()}, on(device)));
  }
  torch::Tensor forward(const torch::Tensor& tokens) {  // [b, s] -> logits [b, s, vocab(/tp)]
    auto h = titan::call(tok_embeddings, tokens);
    auto pq = pos_q.narrow(0, 0, tokens.size(1)), pk = pos_k.narrow(0, 0, tokens.size(1));
    for (const auto& layer : *layers) h = titan::call(layer->as<BlockImpl>(), h, pq, pk);
    return titan::call(output, titan::call(norm, h));
  }
  Table tok_embeddings{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  Linear output{nullptr};
  torch::Tensor pos_q, pos_k;
};
TORCH_MODULE(TinyLlama);

inline titan::examples::TransformerTpDims dims_of(const TinyArgs& a) {
  return titan::examples::TransformerTpDims()
      .dim(a.dim)
      .n_heads(a.n_heads)
      .n_kv_heads(a.n_kv_heads)
      .hidden_dim(a.hidden)
      .vocab_size(a.vocab);
}

}  // namespace tp_test
