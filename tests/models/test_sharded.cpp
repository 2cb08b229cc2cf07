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
  // ep borrows the tensor-parallel ranks first, then data-parallel ones (torchtitan's ETP = 1):
  // - tp 1: the experts shared by ep = 2 data ranks (4 of 8 each, tokens by all-to-all); at 4 ranks
  //   each expert's unit is also FSDP-sharded over the 2 ranks outside ep (efsdp);
  // - tp 2, ep 2: ep is the tp group. With sequence parallel each tp rank routes its part of the
  //   sequence; the experts' gradients then add up over ep rather than average (factor ep / tp = 1)
  //   and only the router's are summed over tp. Without it every tp rank sends the whole sequence
  //   (factor ep). Qwen3's q/k norms act on the rank's heads;
  // - 4 ranks, tp 2, ep 4: ep spans tp and the 2 data ranks (factor 2);
  // - 4 ranks, tp 4, ep 2: ep is half of each tp group; efsdp averages over the other half, whose
  //   parts of the sequence add up (factor 1/2).
  // - expert tensor parallel (etp = tp): each expert split over the tp pair, every tp rank routing
  //   the whole sequence; at 4 ranks with EP 2 over the data ranks, with and without sequence
  //   parallel.
  // Every other weight is FSDP-sharded over the data ranks (none with one data rank).
  struct Case {
    std::string family;
    int64_t tp, ep;
    bool sequence_parallel = true;
    int64_t etp = 1;
  };
  const auto& world = titan_test::world();
  const int64_t n = world->world_size();
  std::vector<Case> cases = {{"mixtral", 1, n >= 2 ? 2 : 1}, {"qwen3_moe", 1, n >= 2 ? 2 : 1}};
  if (n % 2 == 0) {
    cases.push_back({"qwen3_moe", 2, 2});
    cases.push_back({"mixtral", 2, 2, false});
    cases.push_back({"qwen3_moe", 2, n / 2, true, 2});
  }
  if (n == 4) {
    cases.push_back({"qwen3_moe", 2, 4});
    cases.push_back({"qwen3_moe", 4, 2});
    cases.push_back({"mixtral", 2, 2, false, 2});
  }
  for (const auto& [family, tp, ep, sequence_parallel, etp] : cases) {
    CAPTURE(family);
    CAPTURE(tp);
    CAPTURE(ep);
    CAPTURE(sequence_parallel);
    CAPTURE(etp);
    TrainConfig config;
    config.model.name = family;
    config.training.mixed_precision_param = "float32";
    config.activation_checkpoint.mode = "none";
    config.parallelism.tensor_parallel_degree = tp;
    config.parallelism.enable_sequence_parallel = sequence_parallel;
    config.parallelism.enable_loss_parallel = false;
    config.parallelism.expert_parallel_degree = ep;
    config.parallelism.expert_tensor_parallel_degree = etp;
    const auto dims = ParallelDims::from_config(config.parallelism, n);
    auto mesh = dims.build_mesh(world);
    // tp divides the vocabulary and the kv heads
    const auto args = model_args(family, "debug").vocab_size(64).max_seq_len(16).n_layers(2).n_kv_heads(4);
    Transformer reference(args, device());
    init_weights(*reference, 3);
    Transformer model(args, torch::kMeta);
    parallelize_llama(*model, mesh, dims, config);
    titan::to_empty(*model, device());
    init_weights(*model, 3);
    if (dims.ep > 1 || dims.etp > 1) {  // 8 / ep of the 8 experts, FSDP-sharded over efsdp; their hidden / etp
      const auto w1 = titan::sharded_parameters(*model);
      const auto it = std::find_if(w1.begin(), w1.end(), [](const auto& p) { return p.first == "layers.0.moe.experts.w1"; });
      REQUIRE(it != w1.end());
      CHECK(it->second.local.size(0) == 8 / (dims.ep * dims.expert_fsdp_degree()));
      CHECK(it->second.local.size(1) == args.moe_hidden_dim() / dims.etp);
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
    MESSAGE(family, " debug (2 layers) fp32, ranks=", n, ", tp=", tp,
            std::string(sequence_parallel && tp > 1 ? " (sequence parallel)" : ""),
            ", ep=", dims.ep, ", etp=", dims.etp, ": max param diff ", worst,
            " (", worst_name, ")");
    CHECK(worst <= (device().is_cuda() ? 5e-5 : 1e-5));
  }
  // Bad expert-parallel degrees are refused with the keys named.
  ParallelismConfig three;
  three.expert_parallel_degree = 3;
  CHECK_CONTAINS(models_test::error_of([&] { ParallelDims::from_config(three, 4); }),
                 "expert_parallel_degree (3) must divide data_parallel_shard_degree (4) x context_parallel_degree "
                 "(1) x tensor_parallel_degree (1) = 4");
  ParallelismConfig uneven_tp;  // 6 consecutive ranks would take one and a half tp groups of 4
  uneven_tp.tensor_parallel_degree = 4;
  uneven_tp.expert_parallel_degree = 6;
  CHECK_CONTAINS(models_test::error_of([&] { ParallelDims::from_config(uneven_tp, 12); }),
                 "expert_parallel_degree (6) and tensor_parallel_degree (4) must divide one another");
  ParallelismConfig bad_etp;  // etp is 1 or tp
  bad_etp.tensor_parallel_degree = 4;
  bad_etp.expert_tensor_parallel_degree = 2;
  CHECK_CONTAINS(models_test::error_of([&] { ParallelDims::from_config(bad_etp, 4); }),
                 "expert_tensor_parallel_degree (2) must be 1 (each expert whole on a rank) or tensor_parallel_degree (4");
  ParallelismConfig etp_no_dp;  // with each expert split over tp, ep borrows cp and dp_shard only
  etp_no_dp.tensor_parallel_degree = 2;
  etp_no_dp.expert_tensor_parallel_degree = 2;
  etp_no_dp.expert_parallel_degree = 2;
  CHECK_CONTAINS(models_test::error_of([&] { ParallelDims::from_config(etp_no_dp, 2); }),
                 "expert_parallel_degree (2) must divide data_parallel_shard_degree (1) x context_parallel_degree (1) = 1");
  ParallelismConfig uneven_cp;  // past the tp pair, 3 of the 2 cp ranks
  uneven_cp.tensor_parallel_degree = 2;
  uneven_cp.context_parallel_degree = 2;
  uneven_cp.expert_parallel_degree = 6;
  CHECK_CONTAINS(models_test::error_of([&] { ParallelDims::from_config(uneven_cp, 12); }),
                 "expert_parallel_degree (6) / tensor_parallel_degree (2) = 3 and context_parallel_degree (2) must "
                 "divide one another");
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

TEST_CASE("sharded: with fused projections, float8 converting some of q, k, v is an error naming them and the keys") {
  auto world = titan_test::world();
  TrainConfig config;
  config.float8.enable = true;
  const auto dims = ParallelDims::from_config(config.parallelism, world->world_size());
  auto mesh = dims.build_mesh(world);
  auto parallelize = [&](const std::string& filter) {
    config.float8.filter_fqns = filter;
    Transformer llama(model_args("llama3", "debug").n_layers(1).fused_projections(true), torch::kMeta);
    parallelize_llama(*llama, mesh, dims, config);
  };
  CHECK_CONTAINS(models_test::error_of([&] { parallelize("output,wk"); }),
                 "model.fused_projections = true computes layers.0.attention.wq|wk|wv in one call, but float8 "
                 "converts 'layers.0.attention.wq' and leaves 'layers.0.attention.wk' in high precision "
                 "(float8.filter_fqns, or a dimension that is not a multiple of 16): convert all of them or none, "
                 "or set model.fused_projections = false");
  CHECK_CONTAINS(models_test::error_of([&] { parallelize("output,w3"); }), "layers.0.feed_forward.w1|w3 in one call");
  CHECK_NOTHROW(parallelize("output,attention"));  // q, k, v all in high precision, gate and up in float8
}
