#include "model.hpp"

#include "../../common/strings.hpp"

#include <titan/fused.hpp>
#include <titan/hooks.hpp>
#include <titan/sharding.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <map>
#include <string>

namespace titan::examples {

int64_t ModelArgs::effective_head_dim() const { return head_dim() > 0 ? head_dim() : dim() / n_heads(); }

int64_t ModelArgs::hidden_dim() const {
  if (ffn_hidden_dim() > 0) return ffn_hidden_dim();
  auto hidden = static_cast<int64_t>(2 * (4 * dim()) / 3);
  if (ffn_dim_multiplier() > 0) hidden = static_cast<int64_t>(ffn_dim_multiplier() * static_cast<double>(hidden));
  return multiple_of() * ((hidden + multiple_of() - 1) / multiple_of());
}

void ModelArgs::validate() const {
  TORCH_CHECK(dim() > 0 && n_layers() > 0 && n_heads() > 0 && n_kv_heads() > 0 && vocab_size() > 0 &&
                  max_seq_len() > 0 && multiple_of() > 0,
              "ModelArgs: dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len and multiple_of must be "
              "positive (dim ", dim(), ", n_layers ", n_layers(), ", n_heads ", n_heads(), ", n_kv_heads ",
              n_kv_heads(), ", vocab_size ", vocab_size(), ", max_seq_len ", max_seq_len(), ")");
  TORCH_CHECK(n_heads() % n_kv_heads() == 0, "ModelArgs: n_kv_heads ", n_kv_heads(), " must divide n_heads ",
              n_heads());
  TORCH_CHECK(head_dim() > 0 || dim() % n_heads() == 0, "ModelArgs: n_heads ", n_heads(), " must divide dim ", dim(),
              " (or set head_dim)");
  TORCH_CHECK(effective_head_dim() % 2 == 0, "ModelArgs: head_dim ", effective_head_dim(), " must be even for RoPE");
  TORCH_CHECK(sliding_window() >= 0, "ModelArgs: sliding_window must be >= 0, got ", sliding_window());
  TORCH_CHECK(moe_hidden_dim() >= 0, "ModelArgs: moe_hidden_dim must be >= 0 (0: dense blocks), got ", moe_hidden_dim());
  if (is_moe()) titan::check_moe_options(moe());
  if (rope_scaling().enabled())
    TORCH_CHECK(rope_scaling().factor() > 0 && rope_scaling().high_freq_factor() > rope_scaling().low_freq_factor() &&
                    rope_scaling().original_max_position_embeddings() > 0,
                "ModelArgs: rope_scaling needs factor > 0, high_freq_factor > low_freq_factor and "
                "original_max_position_embeddings > 0");
}

namespace {

ModelArgs debug_args() {
  return ModelArgs().dim(256).n_layers(4).n_heads(8).n_kv_heads(2).multiple_of(64).max_seq_len(2048);
}

RopeScaling llama31_scaling() {
  return RopeScaling().enabled(true).factor(8).low_freq_factor(1).high_freq_factor(4).original_max_position_embeddings(
      8192);
}

using FlavorTable = std::map<std::string, std::map<std::string, std::function<ModelArgs()>>>;

const FlavorTable& flavors() {
  static const FlavorTable table = [] {
    FlavorTable t;
    auto llama2 = [](ModelArgs a) { return a.vocab_size(32000).rope_theta(10000).max_seq_len(4096); };
    t["llama2"]["debug"] = [=] { return debug_args().vocab_size(3000).rope_theta(10000); };
    t["llama2"]["7B"] = [=] { return llama2(ModelArgs().dim(4096).n_layers(32).n_heads(32).n_kv_heads(32)); };
    t["llama2"]["13B"] = [=] { return llama2(ModelArgs().dim(5120).n_layers(40).n_heads(40).n_kv_heads(40)); };
    t["llama2"]["70B"] = [=] {
      return llama2(ModelArgs().dim(8192).n_layers(80).n_heads(64).n_kv_heads(8).ffn_dim_multiplier(1.3).multiple_of(
          4096));
    };
    auto llama3 = [](ModelArgs a) { return a.vocab_size(128256).rope_theta(500000).max_seq_len(8192); };
    t["llama3"]["debug"] = [=] { return debug_args().vocab_size(4000).rope_theta(500000); };
    // Llama 3.2 1B's shape with an untied output layer (1.50B parameters): the GPU benchmark's model.
    t["llama3"]["1B"] = [=] {
      return llama3(ModelArgs().dim(2048).n_layers(16).n_heads(32).n_kv_heads(8).ffn_dim_multiplier(1.5).multiple_of(
          256));
    };
    t["llama3"]["8B"] = [=] {
      return llama3(ModelArgs().dim(4096).n_layers(32).n_heads(32).n_kv_heads(8).ffn_dim_multiplier(1.3).multiple_of(
          1024));
    };
    t["llama3"]["70B"] = [=] {
      return llama3(ModelArgs().dim(8192).n_layers(80).n_heads(64).n_kv_heads(8).ffn_dim_multiplier(1.3).multiple_of(
          4096));
    };
    t["llama3"]["405B"] = [=] {
      return llama3(ModelArgs().dim(16384).n_layers(126).n_heads(128).n_kv_heads(8).ffn_dim_multiplier(1.2).multiple_of(
          4096));
    };
    for (const auto& [name, make] : t["llama3"]) {
      auto base = make;
      t["llama3.1"][name] = [base, debug = name == "debug"] {
        return base().rope_scaling(llama31_scaling()).max_seq_len(debug ? 2048 : 131072);
      };
    }
    // Llama 3.2: Llama 3.1's blocks, RoPE scaled by 32, the output tied to the embedding.
    auto llama32 = [=](ModelArgs a) {
      return llama3(a).rope_scaling(llama31_scaling().factor(32)).max_seq_len(131072).tie_embeddings(true);
    };
    t["llama3.2"]["debug"] = [=] { return llama32(debug_args()).vocab_size(4000).max_seq_len(2048); };
    t["llama3.2"]["1B"] = [=] {
      return llama32(ModelArgs().dim(2048).n_layers(16).n_heads(32).n_kv_heads(8).ffn_hidden_dim(8192));
    };
    t["llama3.2"]["3B"] = [=] {
      return llama32(ModelArgs().dim(3072).n_layers(28).n_heads(24).n_kv_heads(8).ffn_hidden_dim(8192));
    };
    t["mistral"]["debug"] = [=] { return debug_args().vocab_size(3000).sliding_window(128); };
    // Mixture-of-experts families: Mixtral (Mistral's attention without the window, top-2 of 8
    // experts, softmax renormalised, each output weighed in fp32 as transformers' Mixtral does) and
    // Qwen3-MoE (q/k norms, top-8 of 128, norm_topk_prob, the weights cast to the activations' dtype).
    auto top_k_of = [](int64_t experts, int64_t k) { return titan::MoeOptions().num_experts(experts).top_k(k); };
    auto mixtral_routing = [=] { return top_k_of(8, 2).fp32_weighting(true); };
    t["mixtral"]["debug"] = [=] {
      return debug_args().vocab_size(3000).rope_theta(1e6).moe_hidden_dim(128).moe(mixtral_routing());
    };
    auto mixtral = [=](ModelArgs a) {
      return a.n_heads(a.dim() / 128).n_kv_heads(8).rope_theta(1e6).moe(mixtral_routing());
    };
    t["mixtral"]["8x7B"] = [=] {
      return mixtral(ModelArgs().dim(4096).n_layers(32).moe_hidden_dim(14336).vocab_size(32000).max_seq_len(32768));
    };
    t["mixtral"]["8x22B"] = [=] {
      return mixtral(ModelArgs().dim(6144).n_layers(56).moe_hidden_dim(16384).vocab_size(32768).max_seq_len(65536));
    };
    // Qwen3's blocks (dense and MoE): q/k norms, RoPE θ 1e6, eps 1e-6.
    auto qwen3_blocks = [](ModelArgs a) { return a.norm_eps(1e-6).rope_theta(1e6).qk_norm(true); };
    t["qwen3_moe"]["debug"] = [=] {
      return qwen3_blocks(debug_args().vocab_size(3000).moe_hidden_dim(64).moe(top_k_of(8, 2)));
    };
    // Qwen3-MoE's published sizes: 4 kv heads of 128, 128 experts, top-8.
    auto qwen3_moe_size = [=](int64_t dim, int64_t layers, int64_t heads, int64_t expert_hidden) {
      return qwen3_blocks(ModelArgs().dim(dim).n_layers(layers).n_heads(heads).n_kv_heads(4).head_dim(128))
          .moe_hidden_dim(expert_hidden)
          .moe(top_k_of(128, 8))
          .vocab_size(151936)
          .max_seq_len(40960);
    };
    t["qwen3_moe"]["30B-A3B"] = [=] { return qwen3_moe_size(2048, 48, 32, 768); };
    t["qwen3_moe"]["235B-A22B"] = [=] { return qwen3_moe_size(4096, 94, 64, 1536); };
    // Qwen2.5: Llama's blocks with q/k/v biases, RoPE θ 1e6; up to 3B the output is tied.
    auto qwen25 = [](ModelArgs a) { return a.qkv_bias(true).norm_eps(1e-6).rope_theta(1e6).max_seq_len(32768); };
    t["qwen2.5"]["debug"] = [=] { return qwen25(debug_args()).vocab_size(3000).max_seq_len(2048); };
    auto qwen25_size = [=](int64_t dim, int64_t layers, int64_t heads, int64_t kv, int64_t ffn, bool tied) {
      return qwen25(ModelArgs().dim(dim).n_layers(layers).n_heads(heads).n_kv_heads(kv).ffn_hidden_dim(ffn))
          .vocab_size(tied ? 151936 : 152064)
          .tie_embeddings(tied);
    };
    t["qwen2.5"]["0.5B"] = [=] { return qwen25_size(896, 24, 14, 2, 4864, true); };
    t["qwen2.5"]["1.5B"] = [=] { return qwen25_size(1536, 28, 12, 2, 8960, true); };
    t["qwen2.5"]["3B"] = [=] { return qwen25_size(2048, 36, 16, 2, 11008, true); };
    t["qwen2.5"]["7B"] = [=] { return qwen25_size(3584, 28, 28, 4, 18944, false); };
    t["qwen2.5"]["14B"] = [=] { return qwen25_size(5120, 48, 40, 8, 13824, false); };
    t["qwen2.5"]["32B"] = [=] { return qwen25_size(5120, 64, 40, 8, 27648, false); };
    t["qwen2.5"]["72B"] = [=] { return qwen25_size(8192, 80, 64, 8, 29568, false); };
    // Qwen3 dense: Llama's blocks with q/k norms and a head width of 128 (not dim / heads); the
    // 0.6B, 1.7B and 4B models tie the output to the embedding.
    t["qwen3"]["debug"] = [=] { return qwen3_blocks(debug_args().vocab_size(3000)); };
    auto qwen3_size = [=](int64_t dim, int64_t layers, int64_t heads, int64_t ffn, bool tied) {
      return qwen3_blocks(ModelArgs().dim(dim).n_layers(layers).n_heads(heads).n_kv_heads(8).head_dim(128))
          .ffn_hidden_dim(ffn)
          .vocab_size(151936)
          .max_seq_len(40960)
          .tie_embeddings(tied);
    };
    t["qwen3"]["0.6B"] = [=] { return qwen3_size(1024, 28, 16, 3072, true); };
    t["qwen3"]["1.7B"] = [=] { return qwen3_size(2048, 28, 16, 6144, true); };
    t["qwen3"]["4B"] = [=] { return qwen3_size(2560, 36, 32, 9728, true); };
    t["qwen3"]["8B"] = [=] { return qwen3_size(4096, 36, 32, 12288, false); };
    t["qwen3"]["14B"] = [=] { return qwen3_size(5120, 40, 40, 17408, false); };
    t["qwen3"]["32B"] = [=] { return qwen3_size(5120, 64, 64, 25600, false); };
    t["mistral"]["7B"] = [=] {
      return ModelArgs()
          .dim(4096)
          .n_layers(32)
          .n_heads(32)
          .n_kv_heads(8)
          .ffn_hidden_dim(14336)
          .vocab_size(32000)
          .rope_theta(10000)
          .sliding_window(4096)
          .max_seq_len(32768);
    };
    return t;
  }();
  return table;
}

}  // namespace

std::vector<std::string> model_flavors() {
  std::vector<std::string> names;
  for (const auto& [family, table] : flavors())
    for (const auto& entry : table) names.push_back(family + "/" + entry.first);
  return names;
}

ModelArgs model_args(const std::string& family, const std::string& flavor) {
  auto f = flavors().find(family);
  TORCH_CHECK(f != flavors().end(), "model_args: unknown model family '", family, "' (known: ", join(model_flavors()),
              ")");
  auto it = f->second.find(flavor);
  TORCH_CHECK(it != f->second.end(), "model_args: unknown flavor '", flavor, "' of ", family, " (known: ",
              join(model_flavors()), ")");
  return it->second();
}

int64_t parameter_count(const ModelArgs& args, bool include_embedding, bool active_only) {
  const int64_t d = args.dim(), hd = args.effective_head_dim();
  const int64_t attention = d * hd * (2 * args.n_heads() + 2 * args.n_kv_heads()) + (args.qk_norm() ? 2 * hd : 0) +
                            (args.qkv_bias() ? hd * (args.n_heads() + 2 * args.n_kv_heads()) : 0);
  int64_t ffn = 3 * d * args.hidden_dim();
  if (args.is_moe()) {
    const auto& moe = args.moe();
    const int64_t experts = active_only ? moe.top_k() : moe.num_experts();
    ffn = experts * 3 * d * args.moe_hidden_dim() + moe.num_experts() * d + 3 * d * moe.shared_hidden();  // + gate
  }
  const int64_t per_layer = attention + ffn + 2 * d;
  int64_t total = args.n_layers() * per_layer + d;  // layers, norm
  if (!args.tie_embeddings()) total += args.vocab_size() * d;  // output
  if (include_embedding) total += args.vocab_size() * d;
  return total;
}

double flops_per_token(const ModelArgs& args, int64_t seq_len) {
  // The matmuls' parameters: a tied output multiplies by the embedding's weight too.
  const double n = static_cast<double>(parameter_count(args, /*include_embedding=*/false, /*active_only=*/true) +
                                       (args.tie_embeddings() ? args.vocab_size() * args.dim() : 0));
  return 6.0 * n + 12.0 * static_cast<double>(args.n_layers()) * static_cast<double>(args.n_heads()) *
                       static_cast<double>(args.effective_head_dim()) * static_cast<double>(seq_len);
}

torch::Tensor rope_frequencies(const ModelArgs& args) {
  const int64_t hd = args.effective_head_dim();
  // Same float32 operations as Meta's and transformers' code, so the tables match bit for bit.
  auto exponents = torch::arange(0, hd, 2, torch::kLong).to(torch::kFloat) / static_cast<double>(hd);
  auto inv_freq = 1.0 / torch::pow(args.rope_theta(), exponents);  // [hd / 2]
  const auto& s = args.rope_scaling();
  if (!s.enabled()) return inv_freq;
  const double old_len = static_cast<double>(s.original_max_position_embeddings());
  const double low_freq_wavelen = old_len / s.low_freq_factor();
  const double high_freq_wavelen = old_len / s.high_freq_factor();
  auto wavelen = 2 * M_PI / inv_freq;
  auto scaled = torch::where(wavelen > low_freq_wavelen, inv_freq / s.factor(), inv_freq);
  auto smooth = (old_len / wavelen - s.low_freq_factor()) / (s.high_freq_factor() - s.low_freq_factor());
  auto smoothed = (1 - smooth) * scaled / s.factor() + smooth * scaled;
  auto medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
  return torch::where(medium, smoothed, scaled);
}

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, const torch::TensorOptions& options, bool bias_) {
  weight = register_parameter("weight", torch::empty({out_features, in_features}, options));
  if (bias_) bias = register_parameter("bias", torch::empty({out_features}, options));
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) { return torch::nn::functional::linear(x, weight, bias); }

EmbeddingImpl::EmbeddingImpl(int64_t num_embeddings, int64_t dim, const torch::TensorOptions& options) {
  weight = register_parameter("weight", torch::empty({num_embeddings, dim}, options));
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& tokens) { return torch::embedding(weight, tokens); }

TiedLinearImpl::TiedLinearImpl(Embedding embedding_) : embedding(std::move(embedding_)) {}

torch::Tensor TiedLinearImpl::forward(const torch::Tensor& x) {
  return torch::nn::functional::linear(x, embedding->weight);  // [..., num]
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, const torch::TensorOptions& options) : eps(eps_) {
  weight = register_parameter("weight", torch::empty({dim}, options));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  // x [..., dim]; the weight in x's dtype (a no-op when they match), so that CUDA takes the fused kernel
  return at::rms_norm(x, {weight.size(0)}, weight.to(x.scalar_type()), eps);
}

std::tuple<torch::Tensor, torch::Tensor> RMSNormImpl::forward(const torch::Tensor& x, const torch::Tensor& delta) {
  // x, delta [..., dim] -> (x + delta, its norm) [..., dim] each
  return titan::add_rms_norm(x, delta, weight.to(x.scalar_type()), eps);
}

AttentionCoreImpl::AttentionCoreImpl(int64_t sliding_window_) : sliding_window(sliding_window_) {}

torch::Tensor AttentionCoreImpl::forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         const torch::Tensor& documents) {
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "Attention: ", q.size(1), " query heads are not a multiple of ", k.size(1),
              " key/value heads");
  const int64_t seq = q.size(2);
  const bool grouped = q.size(1) != k.size(1);  // SDPA shares each kv head with its query heads (no copies)
  const bool windowed = sliding_window > 0 && seq > sliding_window;
  if (windowed || documents.defined()) {
    // An explicit boolean mask (S^2 bytes per row, and no flash kernel) only when the window cuts
    // or the row holds several documents.
    auto pos = torch::arange(seq, torch::TensorOptions().dtype(torch::kLong).device(q.device()));
    auto distance = pos.unsqueeze(1) - pos.unsqueeze(0);  // [S, S]: query - key
    auto mask = distance.ge(0);                           // [S, S]: causal
    if (windowed) mask = mask.logical_and(distance.lt(sliding_window));
    if (documents.defined())  // [B, 1, S, S]: query and key in the same document
      mask = mask.logical_and(documents.unsqueeze(2).eq(documents.unsqueeze(1))).unsqueeze(1);
    return at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/false, std::nullopt, grouped);
  }
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, std::nullopt, grouped);
}

namespace {

/// The outputs of linear `layers` that read x [B, S, dim]: one GEMM over their weights laid end to
/// end (titan::linear_fused, through the layers' hooks by titan::call_fused) when `fused`, else
/// one titan::call each.
template <size_t N>
std::array<torch::Tensor, N> project(const torch::Tensor& x, Linear (&&layers)[N], bool fused) {
  std::array<torch::Tensor, N> outputs;
  if (!fused) {
    for (size_t i = 0; i < N; ++i) outputs[i] = titan::call(layers[i], x);
    return outputs;
  }
  std::vector<torch::nn::Module*> modules;
  for (auto& layer : layers) modules.push_back(layer.get());
  const auto parts = titan::call_fused(modules, {x}, [&layers](const titan::TensorList& inputs) {
    std::vector<at::Tensor> weights;
    for (const auto& layer : layers) weights.push_back(layer->weight);
    auto outputs = titan::linear_fused(inputs[0], weights);  // [B, S, out_i] each
    for (size_t i = 0; i < N; ++i)
      if (layers[i]->bias.defined()) outputs[i] = outputs[i] + layers[i]->bias;
    return outputs;
  });
  std::copy(parts.begin(), parts.end(), outputs.begin());
  return outputs;
}

}  // namespace

AttentionImpl::AttentionImpl(const ModelArgs& args, const torch::TensorOptions& options)
    : head_dim(args.effective_head_dim()), fused_projections(args.fused_projections()) {
  const int64_t d = args.dim();
  wq = register_module("wq", Linear(d, args.n_heads() * head_dim, options, args.qkv_bias()));
  wk = register_module("wk", Linear(d, args.n_kv_heads() * head_dim, options, args.qkv_bias()));
  wv = register_module("wv", Linear(d, args.n_kv_heads() * head_dim, options, args.qkv_bias()));
  wo = register_module("wo", Linear(args.n_heads() * head_dim, d, options));
  if (args.qk_norm()) {
    q_norm = register_module("q_norm", RMSNorm(head_dim, args.norm_eps(), options));
    k_norm = register_module("k_norm", RMSNorm(head_dim, args.norm_eps(), options));
  }
  core = register_module("core", AttentionCore(args.sliding_window()));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& rope_cos,
                                     const torch::Tensor& rope_sin, const torch::Tensor& documents) {
  const int64_t batch = x.size(0), seq = x.size(1);
  auto [q, k, v] = project(x, {wq, wk, wv}, fused_projections);  // [B, S, Hq * hd], [B, S, Hkv * hd] x 2
  q = q.view({batch, seq, -1, head_dim});  // [B, S, Hq, hd] (local heads under TP)
  k = k.view({batch, seq, -1, head_dim});  // [B, S, Hkv, hd]
  v = v.view({batch, seq, -1, head_dim});  // [B, S, Hkv, hd]
  if (q_norm) {  // Qwen3: each head normalised before RoPE
    q = titan::call(q_norm, q);  // [B, S, Hq, hd]
    k = titan::call(k_norm, k);  // [B, S, Hkv, hd]
  }
  // Meta's interleaved pairs rotated by position, q and k in one operator (in fp32, by the fp32
  // tables [S, hd / 2]: FSDP leaves a block's inputs uncast, see parallelize.cpp).
  auto [q_rotated, k_rotated] = titan::rope(q, k, rope_cos, rope_sin);  // [B, S, Hq, hd], [B, S, Hkv, hd]
  auto out = documents.defined()
                 ? titan::call(core, q_rotated.transpose(1, 2), k_rotated.transpose(1, 2), v.transpose(1, 2),
                               documents)
                 : titan::call(core, q_rotated.transpose(1, 2), k_rotated.transpose(1, 2),
                               v.transpose(1, 2));  // [B, Hq, S, hd]
  return titan::call(wo, out.transpose(1, 2).reshape({batch, seq, -1}));  // [B, S, dim]
}

FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t hidden_dim, const torch::TensorOptions& options,
                                 bool fused_projections_)
    : fused_projections(fused_projections_) {
  // torchtitan's order; fused, w3 right after w1, so that FSDP's unit storage holds them end to end
  // and their GEMM reads them without a copy (titan::linear_fused). Names are the same either way.
  w1 = register_module("w1", Linear(dim, hidden_dim, options));
  if (fused_projections) w3 = register_module("w3", Linear(dim, hidden_dim, options));
  w2 = register_module("w2", Linear(hidden_dim, dim, options));
  if (!fused_projections) w3 = register_module("w3", Linear(dim, hidden_dim, options));
}

torch::Tensor FeedForwardImpl::forward(const torch::Tensor& x) {
  const auto [gate, up] = project(x, {w1, w3}, fused_projections);  // [B, S, hidden] each
  return titan::call(w2, titan::swiglu(gate, up));                  // [B, S, dim]: silu(gate) * up, one operator
}

TransformerBlockImpl::TransformerBlockImpl(int64_t layer_id_, const ModelArgs& args,
                                           const torch::TensorOptions& options)
    : layer_id(layer_id_) {
  attention = register_module("attention", Attention(args, options));
  if (args.is_moe())
    moe = register_module("moe", titan::MoE(args.dim(), args.moe_hidden_dim(), args.moe(), options));
  else
    feed_forward =
        register_module("feed_forward", FeedForward(args.dim(), args.hidden_dim(), options, args.fused_projections()));
  attention_norm = register_module("attention_norm", RMSNorm(args.dim(), args.norm_eps(), options));
  ffn_norm = register_module("ffn_norm", RMSNorm(args.dim(), args.norm_eps(), options));
}

torch::Tensor TransformerBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& rope_cos,
                                            const torch::Tensor& rope_sin, const torch::Tensor& documents) {
  // h = x + attention(...) and its norm in one operator: [B, S, dim] each
  const auto normed_x = titan::call(attention_norm, x);
  const auto attention_out = documents.defined()
                                 ? titan::call(attention, normed_x, rope_cos, rope_sin, documents)
                                 : titan::call(attention, normed_x, rope_cos, rope_sin);
  auto [h, normed] = titan::call(ffn_norm, x, attention_out);
  return h + (moe ? titan::call(moe, normed) : titan::call(feed_forward, normed));  // [B, S, dim]
}

void TransformerImpl::reset_rope_tables() {
  torch::NoGradGuard no_grad;
  auto positions = torch::arange(args.max_seq_len(), torch::kLong).to(torch::kFloat);
  auto angles = torch::outer(positions, rope_frequencies(args));  // [max_seq_len, hd / 2]
  rope_cos.copy_(angles.cos());
  rope_sin.copy_(angles.sin());
}

TransformerImpl::TransformerImpl(ModelArgs args_, torch::Device device) : args(std::move(args_)) {
  args.validate();
  auto options = torch::TensorOptions().dtype(args.dtype()).device(device);
  tok_embeddings = register_module("tok_embeddings", Embedding(args.vocab_size(), args.dim(), options));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < args.n_layers(); ++i) layers->push_back(TransformerBlock(i, args, options));
  norm = register_module("norm", RMSNorm(args.dim(), args.norm_eps(), options));
  if (args.tie_embeddings())
    tied_output = register_module("output", TiedLinear(tok_embeddings));
  else
    output = register_module("output", Linear(args.dim(), args.vocab_size(), options));
  auto table_options = torch::TensorOptions().dtype(torch::kFloat).device(device);
  const int64_t half = args.effective_head_dim() / 2;
  rope_cos = register_buffer("rope_cos", torch::empty({args.max_seq_len(), half}, table_options));
  rope_sin = register_buffer("rope_sin", torch::empty({args.max_seq_len(), half}, table_options));
  if (!device.is_meta()) reset_rope_tables();
}

torch::Tensor TransformerImpl::forward(const torch::Tensor& input, const torch::Tensor& positions,
                                       const torch::Tensor& documents) {
  // A pipeline stage holds only some of the modules (titan::keep_pipeline_stage): without the
  // embedding its input is the previous stage's hidden states, without the output layer it
  // returns them.
  const auto children = named_children();
  const bool embeds = children.contains("tok_embeddings"), outputs = children.contains("output");
  TORCH_CHECK(input.dim() == (embeds ? 2 : 3), "Transformer: the input must be ",
              embeds ? "tokens [batch, seq]" : "hidden states [batch, seq, dim] (a pipeline stage)", ", got ",
              input.sizes());
  const int64_t seq = input.size(1);
  TORCH_CHECK(seq <= args.max_seq_len(), "Transformer: sequence length ", seq, " exceeds max_seq_len ",
              args.max_seq_len());
  torch::Tensor cos, sin;  // [S, hd / 2]
  if (positions.defined()) {
    TORCH_CHECK(positions.dim() == 1 && positions.size(0) == seq && positions.scalar_type() == torch::kLong,
                "Transformer: positions must be int64 [", seq, "] (one per token), got ", positions.scalar_type(), " ",
                positions.sizes());
    cos = rope_cos.index_select(0, positions);
    sin = rope_sin.index_select(0, positions);
  } else {
    cos = rope_cos.narrow(0, 0, seq);
    sin = rope_sin.narrow(0, 0, seq);
  }
  TORCH_CHECK(!documents.defined() || (documents.dim() == 2 && documents.size(0) == input.size(0) &&
                                        documents.size(1) == seq && documents.scalar_type() == torch::kLong),
              "Transformer: documents must be int64 [", input.size(0), ", ", seq, "] (one per token), got ",
              documents.scalar_type(), " ", documents.sizes());
  auto h = embeds ? titan::call(tok_embeddings, input) : input;  // [B, S, dim]
  for (const auto& layer : layers->children()) {
    auto& block = *layer->as<TransformerBlockImpl>();
    h = documents.defined() ? titan::call(block, h, cos, sin, documents) : titan::call(block, h, cos, sin);
  }
  if (!outputs) return h;  // [B, S, dim]
  h = titan::call(norm, h);
  // A tied output reads the embedding's weight inside the model's own call: under fully_shard
  // the root unit (which holds both) keeps it gathered through the forward, and autograd sums
  // both uses' gradients.
  return args.tie_embeddings() ? titan::call(tied_output, h) : titan::call(output, h);  // [B, S, vocab]
}

namespace {

uint64_t name_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull ^ (seed * 0x9E3779B97F4A7C15ull);  // FNV-1a over the name
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return h;
}

/// PyTorch's trunc_normal_: normal(mean, std) restricted to [a, b], by inverse-CDF sampling.
void trunc_normal(torch::Tensor& t, double std, double a, double b, at::Generator& gen) {
  auto cdf = [](double x) { return (1.0 + std::erf(x / std::sqrt(2.0))) / 2.0; };
  const double l = cdf(a / std), u = cdf(b / std);
  t.uniform_(2 * l - 1, 2 * u - 1, gen).erfinv_().mul_(std * std::sqrt(2.0)).clamp_(a, b);
}

/// splitmix64: a well-mixed 64-bit value of `x` (seeds of neighbouring tiles are unrelated).
uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// Fills `t` (a tile of parameter `name`, fp32 on the CPU) from `gen` by torchtitan's rule for
/// that parameter.
void draw(const std::string& name, const ModelArgs& args, torch::Tensor& t, at::Generator& gen) {
  if (name == "tok_embeddings.weight" && !args.tie_embeddings()) {
    t.normal_(0.0, 1.0, gen);
  } else if (name == "output.weight" || name == "tok_embeddings.weight") {  // tied: drawn as the output
    const double std = std::pow(static_cast<double>(args.dim()), -0.5);
    trunc_normal(t, std, -3 * std, 3 * std, gen);
  } else if (ends_with(name, "attention.wo.weight") || ends_with(name, "feed_forward.w2.weight") ||
             ends_with(name, "feed_forward.w3.weight") || ends_with(name, "experts.w2") ||
             ends_with(name, "experts.w3")) {  // experts: routed (moe.experts) and shared
    TORCH_CHECK(name.rfind("layers.", 0) == 0, "init_weights: unexpected parameter '", name, "'");
    const int64_t layer_id = std::stoll(name.substr(7, name.find('.', 7) - 7));
    const double depth = args.depth_init() ? 2.0 * static_cast<double>(layer_id + 1)
                                           : 2.0 * static_cast<double>(args.n_layers());
    trunc_normal(t, 0.02 / std::sqrt(depth), -2.0, 2.0, gen);
  } else if (ends_with(name, "attention.wq.weight") || ends_with(name, "attention.wk.weight") ||
             ends_with(name, "attention.wv.weight") || ends_with(name, "feed_forward.w1.weight") ||
             ends_with(name, "moe.gate.weight") || ends_with(name, "experts.w1")) {
    trunc_normal(t, 0.02, -2.0, 2.0, gen);
  } else {
    TORCH_CHECK(false, "init_weights: no initialisation rule for parameter '", name, "'");
  }
}

}  // namespace

int64_t init_tile_rows(const std::vector<int64_t>& global_shape) {
  int64_t row_numel = 1;
  for (size_t d = 1; d < global_shape.size(); ++d) row_numel *= global_shape[d];
  return std::max<int64_t>(1, kInitTileElements / std::max<int64_t>(row_numel, 1));
}

void init_parameter(const std::string& name, const titan::TensorLayout& layout, torch::Tensor local,
                    const ModelArgs& args, uint64_t seed) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(!local.is_meta(), "init_weights: parameter '", name,
              "' is on the meta device: call titan::to_empty(model, device) first");
  if (ends_with(name, "norm.weight")) {
    local.fill_(1.0);
    return;
  }
  if (ends_with(name, ".bias")) {  // the q/k/v biases (Qwen2): zero, as transformers initialises them
    local.zero_();
    return;
  }
  const auto& shape = layout.global_shape;
  const int64_t tile_rows = init_tile_rows(shape);
  const uint64_t parameter_seed = name_seed(seed, name);
  for (const auto& block : layout.local_blocks()) {
    auto target = block.view_of(local);  // this block's elements in the local tensor
    const int64_t first = block.box.offsets[0], rows = block.box.sizes[0];
    if (rows == 0) continue;
    // The tiles of rows [first, first + rows): each drawn whole, from its own generator, on the
    // CPU; this block keeps its rectangle of each.
    for (int64_t tile = first / tile_rows; tile * tile_rows < first + rows; ++tile) {
      const int64_t start = tile * tile_rows, length = std::min(tile_rows, shape[0] - start);
      auto tile_shape = shape;
      tile_shape[0] = length;
      auto values = torch::empty(tile_shape, torch::kFloat);  // [length, ...]
      auto gen = at::detail::createCPUGenerator(mix64(parameter_seed ^ mix64(static_cast<uint64_t>(tile))));
      draw(name, args, values, gen);
      const int64_t from = std::max(first, start), to = std::min(first + rows, start + length);
      auto piece = values.narrow(0, from - start, to - from);
      for (size_t d = 1; d < shape.size(); ++d)
        piece = piece.narrow(static_cast<int64_t>(d), block.box.offsets[d], block.box.sizes[d]);
      target.narrow(0, from - first, to - from).copy_(piece);
    }
  }
}

void init_weights(TransformerImpl& model, uint64_t seed) {
  for (const auto& item : model.named_parameters())
    init_parameter(item.key(), titan::parameter_layout(model, item.key(), item.value()), item.value(), model.args, seed);
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_buffers())
    if (ends_with(item.key(), "expert_bias")) item.value().zero_();  // balanced: no expert favoured
  model.reset_rope_tables();
}

torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& tokens) {
  const int64_t vocab = logits.size(-1);
  auto predictions = logits.narrow(1, 0, logits.size(1) - 1).to(torch::kFloat).reshape({-1, vocab});  // [B(S-1), V]
  auto targets = tokens.narrow(1, 1, tokens.size(1) - 1).reshape({-1});                              // [B(S-1)]
  return torch::nn::functional::cross_entropy(predictions, targets);
}

}  // namespace titan::examples
