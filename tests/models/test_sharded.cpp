// The example Transformer under titan::fully_shard (run at 1, 2 and 4 ranks): built on meta,
// sharded, materialised, then init_weights / load_hf must give every rank exactly its block of
// the values the unsharded model gets, the sharded forward must match, and training must follow
// the single-process run. The models and tokens live on titan_test::device().
#include "../support/multirank.hpp"
#include "support.hpp"

#include "models/llama/model.hpp"
#include "models/llama/parallelize.hpp"
#include "models/llama/state_dict_adapter.hpp"

#include <titan/fsdp.hpp>
#include <titan/meta.hpp>
#include <titan/safetensors.hpp>
#include <titan/tensor_parallel.hpp>

#include <filesystem>

#include <torch/optim/adamw.h>

using namespace titan::examples;
using titan_test::device;

namespace {

ModelArgs small_args() {
  return ModelArgs().dim(64).n_layers(2).n_heads(4).n_kv_heads(2).vocab_size(97).multiple_of(32).max_seq_len(32);
}

/// A model built on meta, sharded over every rank (blocks, then the root), given storage on device().
Transformer sharded_model(const ModelArgs& args) {
  Transformer model(args, torch::kMeta);
  titan::DeviceMesh mesh(titan_test::world(), {"dp_shard"}, {titan_test::world()->world_size()});
  for (const auto& layer : *model->layers) titan::fully_shard(layer, mesh);
  titan::fully_shard(model, mesh);
  titan::to_empty(*model, device());
  return model;
}

/// Checks every local shard of `sharded` against its block of `full`'s parameter.
void check_blocks(const TransformerImpl& sharded, const TransformerImpl& full) {
  auto params = full.named_parameters();
  for (const auto& [name, shard] : titan::sharded_parameters(sharded)) {
    CAPTURE(name);
    CHECK(shard.layout.global_shape == params[name].sizes().vec());
    auto block = params[name];
    for (size_t d = 0; d < shard.box().sizes.size(); ++d)
      block = block.narrow(static_cast<int64_t>(d), shard.box().offsets[d], shard.box().sizes[d]);
    CHECK(torch::equal(shard.local, block));
  }
}

}  // namespace

TEST_CASE("sharded: init_weights and load_hf fill each rank's block; forward matches") {
  const auto args = small_args();
  Transformer full(args, device());
  init_weights(*full, 5);

  auto model = sharded_model(args);
  init_weights(*model, 5);
  check_blocks(*model, *full);
  if (titan_test::world()->world_size() > 1) {
    // Really sharded: this rank holds only part of wq.
    auto local = titan::sharded_parameters(*model);
    CHECK(local[1].second.local.size(0) < 64);
  }
  torch::manual_seed(11);  // same tokens on every rank
  auto tokens = torch::randint(0, 97, {2, 16}, torch::kLong).to(device());
  CHECK_CLOSE(titan::call(model, tokens), titan::call(full, tokens), 1e-5);

  // load_hf reads only each rank's rectangle, also for q/k rows cut mid-head by the shard.
  const auto dir = models_test::scratch_dir("sharded_rank" + std::to_string(titan_test::world()->rank()));
  save_hf(*full, dir);
  auto loaded = sharded_model(args);
  load_hf(*loaded, dir);
  check_blocks(*loaded, *full);
  if (titan_test::world()->world_size() > 1)
    CHECK_CONTAINS(models_test::error_of([&] { save_hf(*loaded, dir + "/again"); }), "pass the process group");
  else
    CHECK_NOTHROW(save_hf(*loaded, dir + "/again"));  // one rank holds whole tensors

  // With the group, the sharded model exports what the unsharded one does (small files: several
  // files and an index, in bf16), gathered parameter by parameter and written by rank 0 only.
  const auto options = SaveHfOptions().max_shard_bytes(20000).dtype(torch::kBFloat16);
  save_hf(*loaded, dir + "/gathered", options, titan_test::world()->group());
  CHECK(std::filesystem::exists(dir + "/gathered/config.json") == (titan_test::world()->rank() == 0));
  if (titan_test::world()->rank() == 0) {
    save_hf(*full, dir + "/whole", options);
    titan::safetensors::Reader gathered(dir + "/gathered"), whole(dir + "/whole");
    CHECK(gathered.files().size() > 1);
    REQUIRE(gathered.names() == whole.names());
    for (const auto& name : whole.names()) {
      CAPTURE(name);
      auto file_name = [&](const titan::safetensors::Reader& r) {
        return std::filesystem::path(r.file_of(name).path()).filename().string();
      };
      CHECK(file_name(gathered) == file_name(whole));
      CHECK(torch::equal(gathered.read(name), whole.read(name)));
    }
  }
}

TEST_CASE("sharded: init_weights under FSDP x TP gives each rank its block, tiles cut mid-shard") {
  // Vocabulary 2000 x dim 64: tok_embeddings and output span two init tiles of 1024 rows, which
  // the FSDP shards cut in the middle at 2 and 4 ranks.
  const auto args = small_args().vocab_size(2000);
  REQUIRE(init_tile_rows({2000, 64}) == 1024);
  Transformer full(args, device());
  init_weights(*full, 9);

  const int n = titan_test::world()->world_size();
  const int64_t tp = n % 2 == 0 ? 2 : 1;
  Transformer model(args, torch::kMeta);
  titan::DeviceMesh mesh(titan_test::world(), {"dp_shard", "tp"}, {n / tp, tp});
  titan::parallelize_module(*model, mesh["tp"], llama_tp_plan(tp_dims(args), tp, TpPlanOptions()));
  for (const auto& layer : *model->layers) titan::fully_shard(layer, mesh["dp_shard"]);
  titan::fully_shard(model, mesh["dp_shard"]);
  titan::to_empty(*model, device());
  init_weights(*model, 9);
  check_blocks(*model, *full);
}

TEST_CASE("sharded: the debug Llama built on meta trains under FSDP like the single-process reference") {
  // Vocabulary 61: the embedding and output rows split unevenly over 2 and 4 ranks.
  const auto args = model_args("llama3", "debug").vocab_size(61).max_seq_len(16).n_layers(2);
  Transformer reference(args, device());
  init_weights(*reference, 0);
  auto model = sharded_model(args);
  init_weights(*model, 0);
  // lr 1e-3: AdamW turns rounding-level gradient differences into updates of up to ~lr.
  auto options = torch::optim::AdamWOptions(1e-3).weight_decay(0.1);
  torch::optim::AdamW optimizer(model->parameters(), options), ref_optimizer(reference->parameters(), options);
  titan::verify_optimizer(optimizer, model);
  const auto& group = titan_test::world()->group();
  const int64_t n = group->size(), rows = 4 / n;  // the global batch of 4 sequences, split over the ranks
  torch::manual_seed(7);
  const auto data = torch::randint(0, 61, {5, 4, 16}).to(device());  // tokens [steps, B, S], the same on every rank
  for (int64_t step = 0; step < 5; ++step) {
    auto ref_loss = causal_lm_loss(reference->forward(data[step]), data[step]);
    ref_optimizer.zero_grad();
    ref_loss.backward();
    ref_optimizer.step();
    auto mine = data[step].narrow(0, group->rank() * rows, rows);
    auto loss = causal_lm_loss(titan::call(model, mine), mine);
    optimizer.zero_grad();
    loss.backward();  // FSDP averages the gradients over the ranks: the mean over the global batch
    optimizer.step();
    const double global = titan::dist_sum(loss.item<double>(), group) / static_cast<double>(n);
    CHECK_MESSAGE(std::abs(global - ref_loss.item<double>()) <= 1e-5, "step ", step, ": loss ", global, " vs ",
                  ref_loss.item<double>());
  }
  titan::verify_calls(model);
  auto full = titan::full_state_dict(model, group, titan::FullStateDictOptions().rank0_only(false));
  double worst = 0.0;
  for (const auto& item : reference->named_parameters())
    worst = std::max(worst, titan_test::max_abs_diff(full[item.key()], item.value()));
  // On CUDA, cuBLAS picks other kernels (summation orders) for the per-rank batch than for the
  // global one; 5e-5 is 1% of the 5 x lr the parameters can move in these steps.
  const double tolerance = device().is_cuda() ? 5e-5 : 1e-5;
  MESSAGE("debug Llama (2 layers) fp32, ranks=", n, ": max param diff ", worst, " (tolerance ", tolerance, ")");
  CHECK(worst <= tolerance);
}

TEST_CASE("sharded: the MoE families train under parallelize_llama with expert parallelism like one process") {
  // At 2 and 4 ranks the experts are shared by ep = 2 ranks (4 of 8 each, tokens by all-to-all);
  // at 4 each expert's unit is also FSDP-sharded over the 2 ranks outside ep. Every other weight is
  // FSDP-sharded over all ranks. At 4 ranks also TP 2 (sequence parallel: the MoE layers on each
  // rank's part of the sequence, Qwen3's q/k norms on its heads) x EP 2 over the 2 data ranks.
  const auto& world = titan_test::world();
  const int64_t n = world->world_size();
  std::vector<std::pair<std::string, int64_t>> cases = {{"mixtral", 1}, {"qwen3_moe", 1}};
  if (n == 4) cases.emplace_back("qwen3_moe", 2);
  for (const auto& [family, tp] : cases) {
    CAPTURE(family);
    CAPTURE(tp);
    TrainConfig config;
    config.model.name = family;
    config.training.mixed_precision_param = "float32";
    config.activation_checkpoint.mode = "none";
    config.parallelism.tensor_parallel_degree = tp;
    config.parallelism.enable_loss_parallel = false;
    config.parallelism.expert_parallel_degree = n / tp >= 2 ? 2 : 1;
    const auto dims = ParallelDims::from_config(config.parallelism, n);
    auto mesh = dims.build_mesh(world);
    const auto args = model_args(family, "debug").vocab_size(64).max_seq_len(16).n_layers(2);  // tp divides 64
    Transformer reference(args, device());
    init_weights(*reference, 3);
    Transformer model(args, torch::kMeta);
    parallelize_llama(*model, mesh, dims, config);
    titan::to_empty(*model, device());
    init_weights(*model, 3);
    if (dims.ep > 1) {  // this rank holds 4 of the 8 experts (its FSDP shard of them over the ranks outside ep)
      const auto w1 = titan::sharded_parameters(*model);
      const auto it = std::find_if(w1.begin(), w1.end(), [](const auto& p) { return p.first == "layers.0.moe.experts.w1"; });
      REQUIRE(it != w1.end());
      CHECK(it->second.local.size(0) == 8 / dims.dp_shard);
    }
    // eps 1e-6: elements whose gradient is rounding noise would otherwise move by ~lr (as in
    // test_tp_models.cpp).
    auto options = torch::optim::AdamWOptions(1e-3).weight_decay(0.1).eps(1e-6);
    torch::optim::AdamW optimizer(model->parameters(), options), ref_optimizer(reference->parameters(), options);
    const auto& group = world->group();
    const int64_t rows = 4 / dims.dp(), dp_rank = mesh.coordinate("dp");
    torch::manual_seed(5);
    const auto data = torch::randint(0, 61, {3, 4, 16}).to(device());  // [steps, B, S], the same on every rank
    for (int64_t step = 0; step < 3; ++step) {
      auto ref_loss = causal_lm_loss(reference->forward(data[step]), data[step]);
      ref_optimizer.zero_grad();
      ref_loss.backward();
      ref_optimizer.step();
      auto mine = data[step].narrow(0, dp_rank * rows, rows);
      auto loss = causal_lm_loss(titan::call(model, mine), mine);
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      const double global = titan::dist_sum(loss.item<double>(), group) / static_cast<double>(n);  // tp ranks agree
      CHECK_MESSAGE(std::abs(global - ref_loss.item<double>()) <= 1e-5, "step ", step, ": loss ", global, " vs ",
                    ref_loss.item<double>());
    }
    titan::verify_calls(model);
    auto full = titan::full_state_dict(model, group, titan::FullStateDictOptions().rank0_only(false));
    double worst = 0.0;
    std::string worst_name;
    for (const auto& item : reference->named_parameters()) {
      CAPTURE(item.key());
      REQUIRE(full.contains(item.key()));
      const double diff = titan_test::max_abs_diff(full[item.key()], item.value());
      if (diff > worst) std::tie(worst, worst_name) = std::make_pair(diff, item.key());
    }
    MESSAGE(family, " debug (2 layers) fp32, ranks=", n, ", tp=", tp, ", ep=", dims.ep, ": max param diff ", worst,
            " (", worst_name, ")");
    CHECK(worst <= (device().is_cuda() ? 5e-5 : 1e-5));
  }
  // Bad expert-parallel degrees are refused with the keys named.
  ParallelismConfig three;
  three.expert_parallel_degree = 3;
  CHECK_CONTAINS(models_test::error_of([&] { ParallelDims::from_config(three, 4); }),
                 "expert_parallel_degree (3) must divide data_parallel_shard_degree (4)");
  if (n >= 2) {
    TrainConfig dense;
    dense.parallelism.expert_parallel_degree = 2;
    const auto dims = ParallelDims::from_config(dense.parallelism, n);
    auto mesh = dims.build_mesh(world);
    Transformer llama(model_args("llama3", "debug").n_layers(1), torch::kMeta);
    CHECK_CONTAINS(models_test::error_of([&] { parallelize_llama(*llama, mesh, dims, dense); }),
                   "expert_parallel_degree = 2 needs a mixture-of-experts model");
  }
}
