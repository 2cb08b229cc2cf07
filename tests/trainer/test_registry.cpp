// Tests of examples/models/registry.cpp: the built-in families, registry errors, and a toy family
// registered at run time trained through the unchanged trainer.
#include "trainer_fixtures.hpp"

#include <models/registry.hpp>
#include <trainer/trainer.hpp>
#include <titan/safetensors.hpp>

#include <nlohmann/json.hpp>


TEST_CASE("registry: a model with a tied output has no output weight, and refuses PP and TP without loss parallel") {
  TrainConfig config;
  config.model.name = "llama3.2";
  config.model.flavor = "debug";
  const auto& spec = model_spec_of(config);
  auto model = spec.build(config, 4000, torch::kMeta);
  CHECK(model->named_children()["output"]->parameters().empty());  // a TiedLinear
  CHECK(model->named_parameters().size() == spec.build(TrainConfig(), 4000, torch::kMeta)->named_parameters().size() - 1);
  config.parallelism.tensor_parallel_degree = 2;
  config.parallelism.enable_loss_parallel = false;
  CHECK_ERROR_HAS(spec.build(config, 4000, torch::kMeta), "model: llama3.2 debug ties its output to the embedding",
                  "parallelism.tensor_parallel_degree = 2 its logits are vocabulary-sharded, so "
                  "parallelism.enable_loss_parallel must be true");
  config.parallelism.enable_loss_parallel = true;
  CHECK_NOTHROW(spec.build(config, 4000, torch::kMeta));
  config.parallelism.pipeline_parallel_degree = 2;
  CHECK_ERROR_HAS(spec.build(config, 4000, torch::kMeta), "parallelism.pipeline_parallel_degree = 2 must be 1");
}

TEST_CASE("registry: the built-in families, and errors that list what is registered") {
  CHECK(model_registry().names() == std::vector<std::string>{"llama2", "llama3", "llama3.1", "llama3.2", "mistral", "mixtral",
                                                                      "qwen2.5", "qwen3", "qwen3_moe"});
  CHECK(model_registry().at("llama3.1").flavors == std::vector<std::string>{"1B", "405B", "70B", "8B", "debug"});
  TrainConfig config;
  config.model.name = "gpt2";
  CHECK_ERROR_HAS(model_spec_of(config), "model.name = 'gpt2' is not a registered model",
                  "llama2, llama3, llama3.1, llama3.2, mistral, mixtral, qwen2.5, qwen3, qwen3_moe");
  config.model.name = "mistral";
  config.model.flavor = "8B";
  CHECK_ERROR_HAS(model_spec_of(config), "model.flavor = '8B' is not a flavor of mistral", "7B, debug");
  ModelRegistry registry;
  ModelSpec incomplete = model_registry().at("llama3");
  incomplete.name = "incomplete";
  incomplete.facts = nullptr;
  CHECK_ERROR_HAS(registry.add(incomplete), "model 'incomplete' has no facts function");
  registry.add(model_registry().at("llama3"));
  CHECK_ERROR_HAS(registry.add(model_registry().at("llama3")), "model 'llama3' is already registered");
}

namespace {

/// A family the trainer has never heard of: an embedding, residual tanh blocks and an output
/// layer, every submodule through titan::call.
struct ToyBlockImpl : torch::nn::Module {
  explicit ToyBlockImpl(int64_t dim, torch::Device device) {
    weight = register_parameter("weight", torch::empty({dim, dim}, torch::TensorOptions().device(device)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return x + torch::tanh(torch::matmul(x, weight.t())); }  // [B, S, dim]
  torch::Tensor weight;  // [dim, dim]
};
TORCH_MODULE(ToyBlock);

struct ToyOutputImpl : torch::nn::Module {
  ToyOutputImpl(int64_t dim, int64_t vocab, torch::Device device) {
    weight = register_parameter("weight", torch::empty({vocab, dim}, torch::TensorOptions().device(device)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return torch::matmul(x, weight.t()); }  // [B, S, vocab]
  torch::Tensor weight;  // [vocab, dim]
};
TORCH_MODULE(ToyOutput);

struct ToyLM : CausalLM {
  ToyLM(int64_t vocab, int64_t dim, int64_t n_layers, torch::Device device) : vocab(vocab) {
    embedding = register_parameter("embedding", torch::empty({vocab, dim}, torch::TensorOptions().device(device)));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < n_layers; ++i) layers->push_back(ToyBlock(dim, device));
    output = register_module("output", ToyOutput(dim, vocab, device));
  }
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& /*positions*/,
                        const torch::Tensor& documents = {}) override {
    TORCH_CHECK(!documents.defined(), "ToyLM: no block-causal attention (model.attn_mask_type = \"causal\")");
    auto h = torch::embedding(embedding, input);  // [B, S, dim]
    for (const auto& layer : *layers) h = titan::call(layer->as<ToyBlockImpl>(), h);
    return titan::call(output, h);  // [B, S, vocab]
  }
  int64_t vocab;
  torch::Tensor embedding;  // [vocab, dim]
  torch::nn::ModuleList layers{nullptr};
  ToyOutput output{nullptr};
};

/// Each parameter drawn whole from a generator seeded by (seed, its index), this rank's block
/// copied out: the values do not depend on sharding.
void init_toy(CausalLM& model, uint64_t seed) {
  torch::NoGradGuard no_grad;
  uint64_t index = 0;
  for (const auto& item : model.named_parameters()) {
    const auto layout = titan::parameter_layout(model, item.key(), item.value());
    auto generator = at::detail::createCPUGenerator(seed * 1000 + index++);
    auto global = torch::randn(layout.global_shape, generator) * 0.2;
    for (const auto& block : layout.local_blocks()) block.view_of(item.value()).copy_(block.view_of_global(global));
  }
}

ModelSpec toy_spec() {
  ModelSpec spec;
  spec.name = "toy";
  spec.flavors = {"debug"};
  spec.build = [](const TrainConfig& config, int64_t vocab, torch::Device device) {
    return std::make_shared<ToyLM>(vocab, 16, config.model.n_layers > 0 ? config.model.n_layers : 2, device);
  };
  spec.parallelize = [](CausalLM& model, const titan::DeviceMesh& mesh, const ParallelDims& dims,
                        const TrainConfig& config) {
    TORCH_CHECK(dims.tp == 1 && dims.cp == 1, "toy: no tensor or context parallel plan");
    auto& toy = dynamic_cast<ToyLM&>(model);
    titan::apply_activation_checkpointing(toy.layers, activation_checkpoint_options(config));
    if (!needs_fsdp(dims, config)) return;
    for (const auto& layer : toy.layers->children()) titan::fully_shard(*layer, dims.fsdp_mesh(mesh), fsdp_options(config));
    titan::fully_shard(toy, dims.fsdp_mesh(mesh), fsdp_options(config));
  };
  spec.pipeline_split = [](const ParallelismConfig&) -> titan::PipelineSplit {
    TORCH_CHECK(false, "toy: no pipeline split");
  };
  spec.init_weights = init_toy;
  spec.facts = [](const CausalLM& model, int64_t) {
    int64_t parameters = 0;
    for (const auto& p : model.parameters()) parameters += p.numel();
    return ModelFacts{parameters, 6.0 * static_cast<double>(parameters), dynamic_cast<const ToyLM&>(model).vocab};
  };
  spec.load_hf = [](CausalLM& stage, const std::string& path) {
    titan::safetensors::File file(path + "/model.safetensors");
    torch::OrderedDict<std::string, at::Tensor> state;
    for (const auto& item : stage.named_parameters()) state.insert(item.key(), file.read(item.key()));
    titan::load_full_state_dict(stage, state);
  };
  spec.save_hf = [](const torch::nn::Module& model, const CausalLM&, const std::string& dir, const SaveHfOptions&,
                    const titan::ProcessGroupPtr& group, const titan::ProcessGroupPtr&) {
    const auto state = titan::full_state_dict(model, group, titan::FullStateDictOptions().rank0_only(true));
    if (group->rank() != 0) return;
    fs::create_directories(dir);
    titan::safetensors::NamedTensors tensors;
    for (const auto& item : state) tensors.emplace_back(item.key(), item.value());
    titan::safetensors::save(dir + "/model.safetensors", tensors);
  };
  return spec;
}

}  // namespace

TEST_CASE("registry: a family registered at run time trains through the unchanged trainer") {
  if (!model_registry().contains("toy")) model_registry().add(toy_spec());
  auto dir = scratch("trainer_toy");
  auto config = tiny_run(dir, {"--model.name", "toy", "--training.steps", "3", "--metrics.log_freq", "1",
                               "--checkpoint.interval", "3"});
  Trainer trainer(config);
  trainer.train();
  // The trainer built the toy (its parameter names), trained it and exported it through the spec.
  const auto params = trainer.model().named_parameters();
  REQUIRE(params.contains("layers.1.weight"));
  CHECK(fs::exists(dir / "run" / "export" / "model.safetensors"));
  CHECK(fs::exists(dir / "run" / "checkpoint" / "step-3"));
  std::ifstream jsonl(dir / "run" / "metrics.jsonl");
  std::vector<double> losses;
  for (std::string text; std::getline(jsonl, text);) losses.push_back(nlohmann::json::parse(text)["loss"].get<double>());
  REQUIRE(losses.size() == 3);

  // Step 1's loss is the mean cross entropy of a toy built and initialised here on the same
  // global batch (the loader's first two micro-batches), and the trained weights moved from it.
  auto tokenizer = load_tokenizer(config.model.tokenizer_path, config.model.tokenizer_kind);
  auto reference = std::static_pointer_cast<ToyLM>(toy_spec().build(config, tokenizer->vocab_size(), device()));
  init_toy(*reference, static_cast<uint64_t>(config.training.seed));
  DataLoader loader(TokenCorpus::open(corpus_options(config, false), *tokenizer), *tokenizer,
                    loader_options(config, 0, 1, false));
  double sum = 0.0, tokens = 0.0;
  for (int micro = 0; micro < 2; ++micro) {
    const auto batch = loader.next();
    auto logits = reference->forward(batch.input.to(device()), {});  // [B, S, vocab]
    sum += torch::nn::functional::cross_entropy(
               logits.flatten(0, 1), batch.labels.to(device()).flatten(),
               torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum))
               .item<double>();
    tokens += static_cast<double>(batch.num_label_tokens);
  }
  CHECK(losses[0] == doctest::Approx(sum / tokens).epsilon(1e-6));
  CHECK(losses[2] < losses[0]);
  CHECK_FALSE(torch::allclose(params["layers.1.weight"].cpu(), reference->layers[1]->as<ToyBlockImpl>()->weight.cpu()));
  // The export reads back into a fresh toy through the spec's Hugging Face adapter.
  auto exported = toy_spec().build(config, tokenizer->vocab_size(), torch::kCPU);
  toy_spec().load_hf(*exported, (dir / "run" / "export").string());
  CHECK(torch::equal(exported->named_parameters()["layers.1.weight"], params["layers.1.weight"].cpu()));
}
