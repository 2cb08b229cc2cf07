#pragma once
// Llama 2, Llama 3 / 3.1 / 3.2, Mistral, Qwen2.5, Qwen3 and the mixture-of-experts decoders built
// on them (Mixtral, Qwen3-MoE: titan::MoE feed-forwards) in plain LibTorch, with torchtitan's
// module and parameter names. No parallelism here: every submodule call goes through titan::call so
// FSDP / tensor parallel / activation checkpointing hooks attach without changing this code, the
// modules create their parameters uninitialised on a given device (build on torch::kMeta, then
// titan::to_empty and init_weights), and attention infers the local head count from tensor shapes
// so tensor parallelism can shard wq/wk/wv/wo.
//
//   auto args = titan::examples::model_args("llama3", "debug").vocab_size(tokenizer.vocab_size());
//   titan::examples::Transformer model(args, torch::kMeta);
//   titan::to_empty(*model, torch::kCUDA);
//   titan::examples::init_weights(*model, /*seed=*/0);
//   auto logits = titan::call(model, tokens);   // [batch, seq, vocab]

#include "../causal_lm.hpp"

#include <titan/moe.hpp>
#include <torch/torch.h>

#include <string>
#include <tuple>
#include <vector>

namespace titan {
struct TensorLayout;  // titan/sharding.hpp
}  // namespace titan

namespace titan::examples {

/// Llama 3.1's RoPE frequency scaling (Hugging Face rope_type "llama3").
struct RopeScaling {
  /// Apply the scaling at all.
  TORCH_ARG(bool, enabled) = false;
  /// Divisor of the low frequencies.
  TORCH_ARG(double, factor) = 8.0;
  /// Wavelengths above original_max_position_embeddings / low_freq_factor are divided by factor.
  TORCH_ARG(double, low_freq_factor) = 1.0;
  /// Wavelengths below original_max_position_embeddings / high_freq_factor are kept.
  TORCH_ARG(double, high_freq_factor) = 4.0;
  /// The context length the model was pre-trained with.
  TORCH_ARG(int64_t, original_max_position_embeddings) = 8192;
};

/// Shape and hyper-parameters of a Llama-family model (torchtitan's TransformerModelArgs).
struct ModelArgs {
  /// Model (embedding) dimension.
  TORCH_ARG(int64_t, dim) = 4096;
  /// Number of transformer blocks.
  TORCH_ARG(int64_t, n_layers) = 32;
  /// Number of query heads.
  TORCH_ARG(int64_t, n_heads) = 32;
  /// Number of key/value heads (grouped-query attention); must divide n_heads.
  TORCH_ARG(int64_t, n_kv_heads) = 32;
  /// Per-head dimension; 0 = dim / n_heads.
  TORCH_ARG(int64_t, head_dim) = 0;
  /// Vocabulary size: set it from the tokenizer.
  TORCH_ARG(int64_t, vocab_size) = 32000;
  /// SwiGLU hidden size is rounded up to a multiple of this (Meta's formula).
  TORCH_ARG(int64_t, multiple_of) = 256;
  /// Multiplier of the SwiGLU hidden size in Meta's formula; 0 = none.
  TORCH_ARG(double, ffn_dim_multiplier) = 0.0;
  /// SwiGLU hidden size given directly (e.g. a Hugging Face intermediate_size); 0 = Meta's formula.
  TORCH_ARG(int64_t, ffn_hidden_dim) = 0;
  /// RMSNorm epsilon.
  TORCH_ARG(double, norm_eps) = 1e-5;
  /// RoPE base.
  TORCH_ARG(double, rope_theta) = 10000.0;
  /// Llama 3.1 RoPE scaling (disabled by default).
  TORCH_ARG(RopeScaling, rope_scaling) = {};
  /// Longest sequence the RoPE tables cover.
  TORCH_ARG(int64_t, max_seq_len) = 2048;
  /// Mistral's sliding-window attention: each position attends to the last `sliding_window`
  /// positions including itself (transformers' convention); 0 = full causal attention.
  TORCH_ARG(int64_t, sliding_window) = 0;
  /// Scale the init std of wo/w2/w3 by the layer's depth (torchtitan's depth_init).
  TORCH_ARG(bool, depth_init) = true;
  /// Parameter dtype.
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat;
  /// Compute wq|wk|wv and w1|w3 as one GEMM each (titan::linear_fused through titan::call_fused);
  /// the parameters stay separate, so state dicts, checkpoints and TP plans are unchanged.
  TORCH_ARG(bool, fused_projections) = false;
  /// Width of each routed expert's SwiGLU: > 0 makes every block's feed-forward a titan::MoE
  /// (layers.N.moe: gate, experts, shared_experts) routed as `moe` says (Mixtral, Qwen3-MoE);
  /// 0 = dense blocks (layers.N.feed_forward).
  TORCH_ARG(int64_t, moe_hidden_dim) = 0;
  /// The MoE layers' routing (experts, top-k, scores, load balancing) when moe_hidden_dim > 0.
  TORCH_ARG(titan::MoeOptions, moe) = {};
  /// RMSNorm of each query and key head before RoPE (Qwen3's q_norm / k_norm, weights [head_dim]).
  TORCH_ARG(bool, qk_norm) = false;
  /// Biases on the query, key and value projections (Qwen2's q_proj / k_proj / v_proj; wo has none).
  TORCH_ARG(bool, qkv_bias) = false;
  /// The output projection is the embedding's weight (Hugging Face's tie_word_embeddings: Llama
  /// 3.2, Qwen2.5 up to 3B, Qwen3 up to 4B): `output` is then a TiedLinear without parameters, and
  /// the logits are linear(norm(h), tok_embeddings.weight). Not with pipeline parallelism.
  TORCH_ARG(bool, tie_embeddings) = false;

 public:
  /// Whether the blocks' feed-forwards are mixtures of experts.
  bool is_moe() const { return moe_hidden_dim() > 0; }
  /// head_dim, or dim / n_heads when it is 0.
  int64_t effective_head_dim() const;
  /// The SwiGLU hidden size: ffn_hidden_dim, else Meta's formula
  /// multiple_of * ceil(ffn_dim_multiplier * (2/3 * 4 * dim) / multiple_of).
  int64_t hidden_dim() const;
  /// Checks the arguments are consistent (heads divide, sizes positive); a clear error otherwise.
  void validate() const;
};

/// The arguments of a named flavor. Families: "llama2" (debug, 7B, 13B, 70B), "llama3" (debug, 1B,
/// 8B, 70B, 405B), "llama3.1" (same shapes as llama3 with RoPE scaling), "llama3.2" (debug, 1B, 3B;
/// tied output), "mistral" (debug, 7B), "mixtral" (debug, 8x7B, 8x22B), "qwen2.5" (debug, 0.5B, 1.5B
/// and 3B with a tied output, 7B, 14B, 32B, 72B), "qwen3" (debug, 0.6B, 1.7B
/// and 4B with a tied output, 8B, 14B, 32B), "qwen3_moe" (debug, 30B-A3B, 235B-A22B). The debug flavors are tiny (dim 256, 4
/// layers, 8 heads, 2 kv heads; 8 experts for the MoE families) for tests; set vocab_size from the
/// tokenizer.
ModelArgs model_args(const std::string& family, const std::string& flavor);
/// Every "family/flavor" model_args accepts.
std::vector<std::string> model_flavors();

/// Number of parameters of the model `args` describes (computed, nothing built; a tied output
/// counts once, as the embedding). With `active_only`, a MoE block counts top_k of its routed
/// experts (the parameters one token uses).
int64_t parameter_count(const ModelArgs& args, bool include_embedding = true, bool active_only = false);
/// Training FLOPs per token at sequence length `seq_len`, torchtitan's estimate:
/// 6 * N + 12 * L * H * Q * T with N the parameters a token uses without the token embedding
/// (active ones: top_k experts of a MoE block; matmul FLOPs of forward + backward: 2 per
/// multiply-add forward, 4 backward), L layers, H heads, Q head_dim and T = seq_len (the attention
/// score and value matmuls, which N does not count). A tied output's matmul counts in N.
double flops_per_token(const ModelArgs& args, int64_t seq_len);

/// The RoPE inverse frequencies [head_dim / 2] (float32), with Llama 3.1 scaling when enabled.
torch::Tensor rope_frequencies(const ModelArgs& args);

/// y = x W^T with W [out, in] created uninitialised on the given device (no bias).
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, const torch::TensorOptions& options, bool bias = false);
  /// x [..., in] -> [..., out]
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;  ///< [out, in]
  torch::Tensor bias;    ///< [out], or undefined (no bias)
};
TORCH_MODULE(Linear);

/// Token embedding table [num, dim] created uninitialised on the given device.
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t dim, const torch::TensorOptions& options);
  /// tokens [B, S] (int64) -> [B, S, dim]
  torch::Tensor forward(const torch::Tensor& tokens);
  torch::Tensor weight;  ///< [num, dim]
};
TORCH_MODULE(Embedding);

/// The output projection of a model whose output is tied to its embedding: x [..., dim] ->
/// [..., num] with the embedding's weight. It holds no parameter (the embedding owns the one
/// weight); under tensor parallelism it multiplies by the embedding's vocabulary shard.
class TiedLinearImpl : public torch::nn::Module {
 public:
  explicit TiedLinearImpl(Embedding embedding);
  torch::Tensor forward(const torch::Tensor& x);
  Embedding embedding;  ///< not a submodule: the model registers it as tok_embeddings
};
TORCH_MODULE(TiedLinear);

/// RMSNorm: x / sqrt(mean(x^2) + eps) * weight, through at::rms_norm: one fused kernel each way on
/// CUDA (input and weight in one dtype), float32 inside. In bf16 the one rounding comes after the
/// weight multiply; Hugging Face's formula rounds the normalised value to bf16 first, then
/// multiplies (a difference of about one bf16 ulp; identical in float32).
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, const torch::TensorOptions& options);
  /// x [..., dim] -> [..., dim]
  torch::Tensor forward(const torch::Tensor& x);
  /// The residual add fused in: (x + delta, forward(x + delta)), both [..., dim], through
  /// titan::add_rms_norm (bitwise the add and forward; one kernel each way with titan's kernels).
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& delta);
  torch::Tensor weight;  ///< [dim]
  double eps;
};
TORCH_MODULE(RMSNorm);

/// The attention core: causal softmax(q kᵀ / sqrt(hd)) v, within the sliding window when one is
/// set, each key/value head shared by a group of query heads (SDPA's enable_gqa: no copies). A
/// module of its own, called through titan::call, because it is the seam for parallelisms that
/// replace attention itself (titan::apply_context_parallel attaches to "layers.*.attention.core").
/// No parameters.
class AttentionCoreImpl : public torch::nn::Module {
 public:
  explicit AttentionCoreImpl(int64_t sliding_window);
  /// q [B, Hq, S, hd], k and v [B, Hkv, S, hd] (positions 0..S-1) -> [B, Hq, S, hd]. With
  /// `documents` [B, S] int64 (each token's document in its packed row), a query attends only to
  /// the keys of its own document (block-causal; an explicit [B, 1, S, S] mask). Context
  /// parallelism takes the same four inputs, the tokens and documents this rank's.
  torch::Tensor forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& documents = {});
  int64_t sliding_window;
};
TORCH_MODULE(AttentionCore);

/// Multi-head attention with grouped-query heads and RoPE (wq, wk, wv, wo, and the core).
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const ModelArgs& args, const torch::TensorOptions& options);
  /// x [B, S, dim], rope_cos/rope_sin [S, head_dim / 2], documents [B, S] int64 or undefined
  /// (AttentionCore) -> [B, S, dim]. Head counts are inferred from the projections'
  /// output sizes, so tensor-parallel shards of wq/wk/wv/wo work unchanged.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& rope_cos, const torch::Tensor& rope_sin,
                        const torch::Tensor& documents = {});
  Linear wq{nullptr}, wk{nullptr}, wv{nullptr}, wo{nullptr};
  RMSNorm q_norm{nullptr}, k_norm{nullptr};  ///< per-head norms [head_dim] with ModelArgs::qk_norm
  AttentionCore core{nullptr};
  int64_t head_dim;
  bool fused_projections;  ///< q, k, v by one GEMM
};
TORCH_MODULE(Attention);

/// SwiGLU feed-forward: w2(silu(w1(x)) * w3(x)).
class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t dim, int64_t hidden_dim, const torch::TensorOptions& options, bool fused_projections = false);
  /// x [B, S, dim] -> [B, S, dim]
  torch::Tensor forward(const torch::Tensor& x);
  Linear w1{nullptr}, w2{nullptr}, w3{nullptr};
  bool fused_projections;  ///< gate and up by one GEMM
};
TORCH_MODULE(FeedForward);

/// One pre-norm block: h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)),
/// or h + moe(ffn_norm(h)) in a mixture-of-experts model.
class TransformerBlockImpl : public torch::nn::Module {
 public:
  TransformerBlockImpl(int64_t layer_id, const ModelArgs& args, const torch::TensorOptions& options);
  /// x [B, S, dim] -> [B, S, dim] (documents: see AttentionCore)
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& rope_cos, const torch::Tensor& rope_sin,
                        const torch::Tensor& documents = {});
  int64_t layer_id;
  Attention attention{nullptr};
  FeedForward feed_forward{nullptr};  ///< dense models
  titan::MoE moe{nullptr};            ///< mixture-of-experts models (ModelArgs::moe_hidden_dim > 0)
  RMSNorm attention_norm{nullptr}, ffn_norm{nullptr};
};
TORCH_MODULE(TransformerBlock);

/// The decoder: tok_embeddings, layers (a ModuleList of TransformerBlock indexed by layer), norm,
/// output (a TiedLinear with ModelArgs::tie_embeddings), and the RoPE tables as buffers rope_cos / rope_sin [max_seq_len, head_dim / 2]
/// (recomputed by init_weights; not model weights: Hugging Face export skips them).
class TransformerImpl : public CausalLM {
 public:
  /// Builds the model with uninitialised tensors on `device` (torch::kMeta allocates nothing).
  TransformerImpl(ModelArgs args, torch::Device device = torch::kCPU);
  /// tokens [B, S] (int64, S <= max_seq_len) -> logits [B, S, vocab_size]. A pipeline stage
  /// (titan::keep_pipeline_stage with llama_pipeline_split) skips the modules it does not hold:
  /// without tok_embeddings the input is hidden states [B, S, dim]; without output it returns them.
  /// `positions` [S] (int64): the tokens' positions for RoPE when they are not 0..S-1, e.g. this
  /// rank's part of the sequence under context parallelism (titan::ContextParallelLayout).
  /// `documents` [B, S] (int64): each token's document in its packed row; attention then stays
  /// within documents (block-causal: each layer's core masks by them). RoPE is relative, so a
  /// document attends as it would alone at positions 0.. (torchtitan's attn_mask_type
  /// "block_causal").
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& positions = {},
                        const torch::Tensor& documents = {}) override;
  /// Recomputes rope_cos / rope_sin from args (wherever the buffers live).
  void reset_rope_tables();
  ModelArgs args;
  Embedding tok_embeddings{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  Linear output{nullptr};            ///< registered as "output" unless the output is tied
  TiedLinear tied_output{nullptr};  ///< registered as "output" when it is tied (ModelArgs::tie_embeddings)
  torch::Tensor rope_cos, rope_sin;
};
TORCH_MODULE(Transformer);

/// Initialises every parameter by name with torchtitan's scheme and recomputes the RoPE buffers:
/// tok_embeddings normal(0, 1) (tied to the output: the output's rule); q/k/v biases 0; wq/wk/wv/w1 and a MoE's gate and experts' w1 truncated normal
/// std 0.02 (cut at +-2); wo/w2/w3 (the experts' too) std 0.02 / sqrt(2 (layer_id + 1))
/// (depth_init, else 0.02 / sqrt(2 n_layers)); output std dim^-0.5 cut at +-3 std; norms 1; the
/// expert bias 0 (torchtitan's MoE init). A global parameter is cut into tiles of whole
/// dim-0 rows (init_tile_rows, ~kInitTileElements each); each tile draws from its own CPU
/// generator seeded by (seed, name, tile). A rank draws only the tiles its blocks
/// (titan::parameter_layout) touch, one at a time, and copies its rectangle of each to the
/// parameter's device: the values are independent of device, sharding and parameter order, and
/// an FSDP rank draws about 1/N of the model (a tensor-parallel rank all of the rows its FSDP
/// shard covers).
void init_weights(TransformerImpl& model, uint64_t seed = 0);

/// Elements per init tile (rounded to whole rows of at least one).
inline constexpr int64_t kInitTileElements = int64_t{1} << 16;
/// Rows per init tile of a parameter of `global_shape`.
int64_t init_tile_rows(const std::vector<int64_t>& global_shape);
/// init_weights for one parameter: fills `local`, the part of parameter `name` that `layout`
/// gives this rank.
void init_parameter(const std::string& name, const titan::TensorLayout& layout, torch::Tensor local,
                    const ModelArgs& args, uint64_t seed);

/// Next-token cross entropy of logits [B, S, V] against tokens [B, S] (predicts tokens[:, 1:] from
/// logits[:, :-1], mean over positions), as transformers' LlamaForCausalLM(labels=tokens) does.
torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& tokens);

}  // namespace titan::examples
