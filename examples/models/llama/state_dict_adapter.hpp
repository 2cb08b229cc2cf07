#pragma once
// Hugging Face interop for the example Transformer: transformers' LlamaForCausalLM /
// MistralForCausalLM / MixtralForCausalLM / Qwen3MoeForCausalLM checkpoints (config.json +
// safetensors, sharded or not) in and out.
//
//   auto args = titan::examples::read_hf_config("Llama-3.1-8B");        // config.json -> ModelArgs
//   titan::examples::Transformer model(args, torch::kMeta);
//   titan::to_empty(*model, device);
//   titan::examples::load_hf(*model, "Llama-3.1-8B");                   // every parameter, by name
//   titan::examples::save_hf(*model, "exported", SaveHfOptions().max_shard_bytes(5LL << 30));
//   titan::examples::save_hf(*sharded, "exported", {}, world->group());   // FSDP/TP: gathered file by file
//
// Names: tok_embeddings <-> model.embed_tokens, layers.i.attention.{wq,wk,wv,wo} <->
// model.layers.i.self_attn.{q,k,v,o}_proj, layers.i.feed_forward.{w1,w2,w3} <->
// model.layers.i.mlp.{gate,down,up}_proj, attention_norm <-> input_layernorm, ffn_norm <->
// post_attention_layernorm, norm <-> model.norm, output <-> lm_head; Qwen3's
// attention.{q,k}_norm <-> self_attn.{q,k}_norm.
// Mixture-of-experts blocks: layers.i.moe.gate <-> Mixtral's model.layers.i.block_sparse_moe.gate
// or Qwen3-MoE's model.layers.i.mlp.gate; the stacked expert weights layers.i.moe.experts.w1 / w2
// / w3 [E, ...] are E tensors on disk, expert j's being block_sparse_moe.experts.j.w1 / w2 / w3
// (Mixtral) or mlp.experts.j.gate_proj / down_proj / up_proj (Qwen3-MoE) (hf_names).
// Hugging Face applies RoPE with rotate-half (dimension i paired with i + head_dim/2) where Meta
// pairs (2i, 2i+1), so the rows of each q/k head are permuted on the way in and out (the permute of
// transformers' convert_llama_weights_to_hf.py).

#include "../registry.hpp"
#include "model.hpp"

#include <titan/sharding.hpp>

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace titan::examples {

/// The transformers name of titan parameter `name` ("layers.0.attention.wq.weight" ->
/// "model.layers.0.self_attn.q_proj.weight") in a model of `args` (its MoE family names the MoE
/// tensors); an error for names outside the model and for stacked expert weights (hf_names).
std::string to_hf_name(const std::string& name, const ModelArgs& args = ModelArgs());
/// The transformers names of titan parameter `name`: one, or E for a MoE's stacked expert weight
/// (expert j's at j).
std::vector<std::string> hf_names(const std::string& name, const ModelArgs& args);
/// The titan name of transformers parameter `hf_name` (of any supported family; an expert's
/// weight gives the stacked parameter); an error for names outside the model.
std::string from_hf_name(const std::string& hf_name);

/// A whole parameter `name` (titan layout) in Hugging Face layout (q/k rows and q/k norm weights
/// permuted; stacked experts as they are: expert j's tensor is row j).
torch::Tensor to_hf_tensor(const std::string& name, const torch::Tensor& tensor, const ModelArgs& args);
/// A whole transformers parameter `hf_name` in titan's layout.
torch::Tensor from_hf_tensor(const std::string& hf_name, const torch::Tensor& tensor, const ModelArgs& args);

/// ModelArgs from a transformers config.json (a file, or a directory holding one) of a
/// LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM or Qwen3MoeForCausalLM: sizes,
/// rms_norm_eps, rope_theta, Llama 3.1 rope scaling (old "rope_scaling" and new "rope_parameters"
/// forms), sliding_window, max_position_embeddings, the experts (count, top-k, width,
/// norm_topk_prob) and Qwen3's q/k norms.
/// Unsupported features (tied embeddings, biases, other activations or rope types) are errors
/// naming the file and key. The parameter dtype stays float32 whatever the checkpoint's dtype
/// (load_hf converts); set args.dtype() to change it.
ModelArgs read_hf_config(const std::string& path);

/// Options of load_hf.
struct LoadHfOptions {
  /// The rectangle of the global (titan-layout) parameter to read into each local parameter; the
  /// default, titan::parameter_layout(model, name, param).local_box(), is the whole tensor for an
  /// unsharded model and this rank's block after fully_shard / tensor parallelism.
  using BoxFn = std::function<titan::TensorBox(const std::string& name, const torch::Tensor& param)>;
  TORCH_ARG(BoxFn, box) = nullptr;
};

/// Loads the Hugging Face checkpoint at `path` (a directory with model.safetensors or
/// model.safetensors.index.json, or one .safetensors file) into `model`, iterating its
/// named_parameters and reading only each parameter's rectangle; recomputes the RoPE tables.
/// Errors name the tensor and file: a parameter missing from the checkpoint, a shape that differs
/// from the parameter's global shape, tensors the model has no place for. A pipeline stage reads
/// its own parameters; the other stages' tensors are expected.
void load_hf(TransformerImpl& model, const std::string& path, const LoadHfOptions& options = {});

/// Exports `model` as a transformers directory `dir` (created if needed): config.json, and
/// model.safetensors or model-0000i-of-0000n.safetensors + model.safetensors.index.json.
/// Without `group` the parameters must be whole on this rank. With `group` (every rank of it
/// calls save_hf) sharded parameters (FSDP, TP, 2-D) are gathered one at a time as rank 0 writes
/// the file holding them, so rank 0 holds at most one file's tensors (max_shard_bytes) and the
/// other ranks one parameter; only rank 0 writes.
void save_hf(const TransformerImpl& model, const std::string& dir, const SaveHfOptions& options = {},
             const titan::ProcessGroupPtr& group = nullptr);

/// save_hf of `model` (the Transformer of `args`, a pipeline stage of it, or a view of several:
/// titan::pipeline_stages_view). With pipeline parallelism pass `pipeline_group` and the group of
/// every rank: each parameter is gathered by its stage's ranks and sent to rank 0, which writes.
void save_hf(const torch::nn::Module& model, const ModelArgs& args, const std::string& dir,
             const SaveHfOptions& options, const titan::ProcessGroupPtr& group,
             const titan::ProcessGroupPtr& pipeline_group = nullptr);

}  // namespace titan::examples
