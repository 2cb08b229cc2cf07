// The Llama-family registration: llama2, llama3, llama3.1, llama3.2, mistral, qwen2.5, qwen3 and
// the mixture-of-experts families mixtral and qwen3_moe share the Transformer of model.hpp, its
// parallelize function, pipeline split and Hugging Face adapter.
#include "../registry.hpp"
#include "parallelize.hpp"
#include "state_dict_adapter.hpp"

namespace titan::examples {
namespace {

TransformerImpl& transformer(CausalLM& model) { return dynamic_cast<TransformerImpl&>(model); }
const TransformerImpl& transformer(const CausalLM& model) { return dynamic_cast<const TransformerImpl&>(model); }

/// The model of `config`: a debug flavor takes its vocabulary from the tokenizer; a real one must
/// cover it. model.n_layers > 0 replaces the flavor's block count.
ModelArgs model_args_for(const TrainConfig& config, int64_t tokenizer_vocab) {
  auto args = model_args(config.model.name, config.model.flavor);
  if (config.model.flavor == "debug") {
    args.vocab_size(tokenizer_vocab);
  } else {
    TORCH_CHECK(tokenizer_vocab <= args.vocab_size(), "model: the tokenizer '", config.model.tokenizer_path, "' has ",
                tokenizer_vocab, " ids but ", config.model.name, " ", config.model.flavor, " has a vocabulary of ",
                args.vocab_size());
  }
  if (config.model.n_layers > 0) args.n_layers(config.model.n_layers);  // a shorter model of the flavor's shape
  args.fused_projections(config.model.fused_projections);
  const auto& parallelism = config.parallelism;
  TORCH_CHECK(!args.tie_embeddings() || parallelism.pipeline_parallel_degree == 1, "model: ", config.model.name, " ",
              config.model.flavor, " ties its output to the embedding (tie_word_embeddings): ",
              "parallelism.pipeline_parallel_degree = ", parallelism.pipeline_parallel_degree, " must be 1 (the ",
              "first and last stages would each hold the one weight, and nothing sums their gradients)");
  TORCH_CHECK(!args.tie_embeddings() || parallelism.tensor_parallel_degree == 1 || parallelism.enable_loss_parallel,
              "model: ", config.model.name, " ", config.model.flavor, " ties its output to the embedding ",
              "(tie_word_embeddings): with parallelism.tensor_parallel_degree = ", parallelism.tensor_parallel_degree,
              " its logits are vocabulary-sharded, so parallelism.enable_loss_parallel must be true");
  const auto& moe = config.moe;
  if (args.is_moe()) {
    auto routing = titan::MoeOptions(args.moe());
    if (moe.top_k > 0) routing.top_k(moe.top_k);
    if (moe.score_func != "flavor") routing.score(titan::parse_router_score(moe.score_func));
    args.moe(routing
                 .aux_loss(moe.aux_loss_coef > 0)
                 .expert_bias(moe.load_balance_coeff > 0)
                 .capacity_factor(moe.capacity_factor));
  } else {
    TORCH_CHECK(moe.aux_loss_coef == 0 && moe.load_balance_coeff == 0 && moe.capacity_factor == 0 &&
                    moe.top_k == 0 && moe.score_func == "flavor",
                "[moe] (top_k ", moe.top_k, ", score_func ", moe.score_func, ", aux_loss_coef ", moe.aux_loss_coef,
                ", load_balance_coeff ", moe.load_balance_coeff, ", capacity_factor ", moe.capacity_factor,
                ") needs a mixture-of-experts model (mixtral, qwen3_moe); ", config.model.name, " has dense blocks");
  }
  args.max_seq_len(config.training.seq_len);
  return args;
}

/// Fails unless the Hugging Face model at `path` has the architecture of `args` (the shapes are
/// checked again per tensor by load_hf).
void check_hf_architecture(const ModelArgs& args, const std::string& path) {
  const auto hf = read_hf_config(path);
  auto check = [&](const char* what, double ours, double theirs) {
    TORCH_CHECK(ours == theirs, "checkpoint.initial_load_path: the Hugging Face model '", path, "' has ", what, " = ",
                theirs, " but the configured model has ", ours, " (check model.name / model.flavor)");
  };
  check("hidden size (dim)", args.dim(), hf.dim());
  check("layers", args.n_layers(), hf.n_layers());
  check("attention heads", args.n_heads(), hf.n_heads());
  check("key/value heads", args.n_kv_heads(), hf.n_kv_heads());
  check("vocabulary size", args.vocab_size(), hf.vocab_size());
  check("rope_theta", args.rope_theta(), hf.rope_theta());
  check("rms_norm_eps", args.norm_eps(), hf.norm_eps());
  check("sliding_window", args.sliding_window(), hf.sliding_window());
  check("head_dim", args.effective_head_dim(), hf.effective_head_dim());
  check("q/k norms (Qwen3)", args.qk_norm(), hf.qk_norm());
  check("tie_word_embeddings", args.tie_embeddings(), hf.tie_embeddings());
  check("q/k/v biases (Qwen2)", args.qkv_bias(), hf.qkv_bias());
  check("expert width (intermediate size; 0: dense)", args.moe_hidden_dim(), hf.moe_hidden_dim());
  if (args.is_moe()) {
    check("experts", args.moe().num_experts(), hf.moe().num_experts());
    check("experts per token", args.moe().top_k(), hf.moe().top_k());
    check("norm_topk_prob", args.moe().route_norm(), hf.moe().route_norm());
  }
}

ModelSpec llama_family_spec(const std::string& name) {
  ModelSpec spec;
  spec.name = name;
  for (const auto& entry : model_flavors())
    if (entry.compare(0, name.size() + 1, name + "/") == 0) spec.flavors.push_back(entry.substr(name.size() + 1));
  spec.build = [](const TrainConfig& config, int64_t tokenizer_vocab, torch::Device device) {
    return std::static_pointer_cast<CausalLM>(Transformer(model_args_for(config, tokenizer_vocab), device).ptr());
  };
  spec.parallelize = [](CausalLM& model, const titan::DeviceMesh& mesh, const ParallelDims& dims,
                        const TrainConfig& config) { parallelize_llama(transformer(model), mesh, dims, config); };
  spec.pipeline_split = llama_pipeline_split;
  spec.init_weights = [](CausalLM& model, uint64_t seed) { init_weights(transformer(model), seed); };
  spec.facts = [](const CausalLM& model, int64_t seq_len) {
    const auto& args = transformer(model).args;
    return ModelFacts{parameter_count(args), flops_per_token(args, seq_len), args.vocab_size()};
  };
  spec.load_hf = [](CausalLM& stage, const std::string& path) {
    check_hf_architecture(transformer(stage).args, path);
    load_hf(transformer(stage), path);
  };
  spec.save_hf = [](const torch::nn::Module& model, const CausalLM& stage, const std::string& dir,
                    const SaveHfOptions& options, const titan::ProcessGroupPtr& group,
                    const titan::ProcessGroupPtr& pipeline_group) {
    save_hf(model, transformer(stage).args, dir, options, group, pipeline_group);
  };
  return spec;
}

}  // namespace

void register_llama(ModelRegistry& registry) {
  for (const char* name :
       {"llama2", "llama3", "llama3.1", "llama3.2", "mistral", "mixtral", "qwen2.5", "qwen3", "qwen3_moe"})
    registry.add(llama_family_spec(name));
}

}  // namespace titan::examples
