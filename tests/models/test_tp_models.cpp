// The example TP plan on the example models (examples/models/llama: Llama 3, Mistral, Mixtral and
// Qwen3-MoE debug flavors): a model built on the meta device, sharded, materialised and initialised by name trains
// exactly like the unsharded model on one process, at TP = world size (1, 2 or 4), both on
// titan_test::device(); also with fused projections.
#include "../support/tp_test_util.hpp"

#include "models/llama/parallelize.hpp"

#include <titan/meta.hpp>

namespace {

using titan::examples::ModelArgs;

/// A small variant of a debug flavor whose head counts divide TP 4 (the debug flavors have 2 kv heads).
ModelArgs small_args(const std::string& family) {
  auto args = titan::examples::model_args(family, "debug").n_layers(2).vocab_size(512).n_kv_heads(4).max_seq_len(64);
  if (args.sliding_window() > 0) args.sliding_window(5);  // shorter than the sequence, so it matters
  return args;
}

/// `fused`: the sharded model computes wq|wk|wv and w1|w3 as one GEMM each (titan::call_fused
/// through the colwise hooks); the reference does not.
void check_model_parity(const std::string& family, bool sequence_parallel, bool loss_parallel, bool fused = false) {
  INFO(family, ", sequence_parallel ", sequence_parallel, ", loss_parallel ", loss_parallel, ", fused ", fused);
  const auto args = small_args(family);
  titan::examples::Transformer reference(args, titan_test::device());
  titan::examples::init_weights(*reference, 11);

  titan::examples::Transformer model(ModelArgs(args).fused_projections(fused), torch::kMeta);
  auto plan = titan::examples::llama_tp_plan(
      titan::examples::tp_dims(args), tp_test::tp_size(),
      titan::examples::TpPlanOptions().sequence_parallel(sequence_parallel).loss_parallel(loss_parallel));
  titan::DeviceMesh mesh(titan_test::world(), {"tp"}, {tp_test::tp_size()});
  titan::parallelize_module(*model, mesh["tp"], plan);
  titan::to_empty(*model, titan_test::device());
  titan::examples::init_weights(*model, 11);  // draws each global tensor and keeps this rank's block

  // eps 1e-6 rather than 1e-8: elements whose gradient is rounding noise (|g| ~ 1e-9, summed in
  // another order by the two runs) would otherwise move by ~lr in random directions.
  auto options = torch::optim::AdamWOptions(3e-3).weight_decay(0.1).eps(1e-6);
  torch::optim::AdamW opt(model->parameters(), options), ref_opt(reference->parameters(), options);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(5);
  for (int step = 0; step < 5; ++step) {
    // The same on every rank.
    auto tokens = at::randint(args.vocab_size(), {2, 17}, generator, torch::kLong).to(titan_test::device());
    auto ref_loss = titan::examples::causal_lm_loss(reference->forward(tokens), tokens);
    auto logits = titan::call(model, tokens);
    auto loss = loss_parallel ? titan::loss_parallel_cross_entropy(logits.narrow(1, 0, 16), tokens.narrow(1, 1, 16),
                                                                    mesh.group("tp"))
                              : titan::examples::causal_lm_loss(logits, tokens);
    INFO("step ", step);
    tp_test::check_step(*model, *reference, opt, ref_opt, loss, ref_loss, loss.item<double>());
  }
  tp_test::check_parameters_match(*model, *reference, tp_test::kAdamParamTol);
}

}  // namespace

TEST_CASE("tp: the example Llama 3, Mistral, Mixtral and Qwen3-MoE with llama_tp_plan match the single-process run") {
  // The MoE layers run on the replicated sequence, or on this rank's part of it with sequence
  // parallel; Qwen3's q/k norms on this rank's heads.
  for (const char* family : {"llama3", "mistral", "mixtral", "qwen3_moe"}) {
    check_model_parity(family, false, false);
    check_model_parity(family, true, true);
  }
  check_model_parity("llama3", true, false);
  check_model_parity("llama3", true, false, /*fused=*/true);
  check_model_parity("mistral", false, false, /*fused=*/true);
}

TEST_CASE("tp: llama_tp_plan names the size that does not divide the TP degree") {
  auto debug = titan::examples::tp_dims(titan::examples::model_args("llama3", "debug"));  // 8 heads, 2 kv heads
  CHECK_NOTHROW(titan::examples::llama_tp_plan(debug, 2));
  CHECK_THROWS_WITH(titan::examples::llama_tp_plan(debug, 4), doctest::Contains("n_kv_heads=2 is not divisible by 4"));
  CHECK_THROWS_WITH(titan::examples::llama_tp_plan(debug, 16), doctest::Contains("n_heads=8 is not divisible by 16"));
}
