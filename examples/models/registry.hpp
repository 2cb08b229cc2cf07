#pragma once
// The model registry: what a model family gives the trainer (torchtitan's TrainSpec), and the
// families by name. The trainer knows no family: it looks up model.name here and drives the
// spec's steps, so a new family is a folder under examples/models/ plus one registration line in
// registry.cpp (or a call to model_registry().add from your own main).
//
//   const ModelSpec& spec = model_registry().at(config.model.name);
//   auto model = spec.build(config, tokenizer.vocab_size(), torch::kMeta);   // [std::shared_ptr<CausalLM>]
//   spec.parallelize(*model, mesh, dims, config);
//   titan::to_empty(*model, device);
//   spec.init_weights(*model, seed);
//   auto logits = titan::call(model, tokens, positions);                      // [B, S, V]
//
// docs/training.md ("A new model family") walks through a registration.

#include "../common/config.hpp"
#include "../common/parallelism.hpp"
#include "causal_lm.hpp"

#include <titan/mesh.hpp>
#include <titan/pipeline.hpp>
#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace titan::examples {

/// Figures of a whole model (not of one stage) that the trainer logs and computes MFU with.
struct ModelFacts {
  int64_t parameters = 0;        ///< every parameter, the token embedding included
  double flops_per_token = 0.0;  ///< training FLOPs per token at the run's sequence length
  int64_t vocab_size = 0;        ///< logits' width (loss parallel needs the whole vocabulary)
};

/// How save_hf writes a Hugging Face export.
struct SaveHfOptions {
  /// Split the weights into files of at most this many bytes (plus an index); 0 = one file.
  TORCH_ARG(int64_t, max_shard_bytes) = 0;
  /// Dtype the weights are stored in; nullopt = each parameter's own.
  TORCH_ARG(std::optional<torch::Dtype>, dtype) = std::nullopt;
};

/// A model family as the trainer uses it. Every function is required (ModelRegistry::add checks).
struct ModelSpec {
  /// model.name, e.g. "llama3".
  std::string name;
  /// The model.flavor values, e.g. {"debug", "8B", "70B"}.
  std::vector<std::string> flavors;
  /// The model of `config` (model.flavor, model.n_layers, model.fused_projections, the sequence
  /// length) with uninitialised tensors on `device` (torch::kMeta allocates nothing).
  /// `tokenizer_vocab` is the tokenizer's size: a debug flavor takes it, a real one must cover it.
  std::function<std::shared_ptr<CausalLM>(const TrainConfig& config, int64_t tokenizer_vocab, torch::Device device)>
      build;
  /// Applies the configured parallelisms (float8, TP, CP, AC, FSDP) to `model`, a whole model or a
  /// pipeline stage, still on the meta device.
  std::function<void(CausalLM& model, const titan::DeviceMesh& mesh, const ParallelDims& dims,
                     const TrainConfig& config)>
      parallelize;
  /// How the model is cut into pipeline stages (the split points from
  /// parallelism.pipeline_parallel_split_points).
  std::function<titan::PipelineSplit(const ParallelismConfig& parallelism)> pipeline_split;
  /// Initialises this rank's part of every parameter from `seed`: the values do not depend on
  /// sharding or device.
  std::function<void(CausalLM& model, uint64_t seed)> init_weights;
  /// The whole model's figures (`model` may be a stage) at sequence length `seq_len`.
  std::function<ModelFacts(const CausalLM& model, int64_t seq_len)> facts;
  /// Loads this rank's part of `stage` from the Hugging Face folder `path`, after checking that
  /// its config.json describes the same architecture (errors name the key and both values).
  std::function<void(CausalLM& stage, const std::string& path)> load_hf;
  /// Exports `model` (a whole model, a stage or titan::pipeline_stages_view of stages, of which
  /// `stage` is one) as a Hugging Face folder `dir`; every rank of `group` calls it, rank 0
  /// writes. `pipeline_group`: the pipeline ranks, or nullptr without pipeline parallelism.
  std::function<void(const torch::nn::Module& model, const CausalLM& stage, const std::string& dir,
                     const SaveHfOptions& options, const titan::ProcessGroupPtr& group,
                     const titan::ProcessGroupPtr& pipeline_group)>
      save_hf;
};

/// Model families by name.
class ModelRegistry {
 public:
  /// Registers `spec`; an error names a missing function, an empty flavor list or a name taken.
  ModelRegistry& add(ModelSpec spec);
  /// The spec named `name`; the error lists the registered names.
  const ModelSpec& at(const std::string& name) const;
  /// Whether `name` is registered.
  bool contains(const std::string& name) const { return specs_.count(name) != 0; }
  /// The registered names, sorted.
  std::vector<std::string> names() const;

 private:
  std::map<std::string, ModelSpec> specs_;
};

/// The registry the trainer reads: the built-in families (registry.cpp), plus any added at run
/// time before the trainer is built.
ModelRegistry& model_registry();

/// Checks that `config` names a registered model and one of its flavors; errors name the key and
/// list the valid values.
const ModelSpec& model_spec_of(const TrainConfig& config);

}  // namespace titan::examples
