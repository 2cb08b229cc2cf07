// 2-D parallelism: tensor parallel inside, FSDP outside, on a (dp_shard, tp) = (2, 2) mesh of 4
// ranks, on the tiny GPT-2 (its fused c_attn is sharded by both). Each dp_shard rank trains on its
// half of the batch; the mean of their losses and the gathered parameters must match one process
// training the unsharded model on the whole batch. Both run on titan_test::device().
#include "../support/tiny_gpt2.hpp"
#include "../support/tp_test_util.hpp"

#include <titan/fsdp.hpp>

TEST_CASE("tp: FSDP 2 x TP 2 on GPT-2 with sequence and loss parallel matches the single-process run") {
  if (tp_test::tp_size() != 4) return;  // needs 4 ranks
  using namespace tp_test;
  const gpt2_test::Gpt2Args a;
  auto reference = gpt2_test::seeded_gpt2(a, titan_test::device(), 9);
  auto model = gpt2_test::seeded_gpt2(a, titan_test::device(), 9);

  titan::DeviceMesh mesh(titan_test::world(), {"dp_shard", "tp"}, {2, 2});
  titan::parallelize_module(model, mesh["tp"], gpt2_test::gpt2_plan(a, true, true));
  for (const auto& block : *model->h) titan::fully_shard(block, mesh["dp_shard"]);
  titan::fully_shard(model, mesh["dp_shard"]);
  // TP shards c_attn's parts, FSDP shards the TP shard's dim 0 again.
  for (const auto& [name, tensor] : titan::sharded_parameters(model))
    if (name == "h.0.attn.c_attn.weight") CHECK(tensor.layout.placement() == "Shard(0)[3 parts]@tp,Shard(0)@dp_shard");

  // eps 1e-6 rather than 1e-8: the key bias's gradient is zero up to rounding (softmax ignores a
  // shift common to all keys), and AdamW would move it by ~lr in the noise's direction.
  auto options = torch::optim::AdamWOptions(1e-2).weight_decay(0.1).eps(1e-6);
  torch::optim::AdamW opt(model->parameters(), options), ref_opt(reference->parameters(), options);
  titan::verify_optimizer(opt, model);
  const int dp = mesh.coordinate("dp_shard");
  for (int step = 0; step < 4; ++step) {
    auto [tokens, labels] = gpt2_test::lm_batch(a, step, titan_test::device());  // the global batch
    labels.index_put_({2, 0}, -100);  // both halves have ignored labels: the loss weighs tokens
    const double valid = labels.ne(-100).sum().item<double>();
    auto ref_loss = torch::cross_entropy_loss(reference->forward(tokens).flatten(0, 1), labels.flatten());
    auto logits = titan::call(model, tokens.narrow(0, 2 * dp, 2));  // this dp rank's half
    // This half's token losses summed, scaled so that FSDP's average over dp gives the global mean.
    auto loss = titan::loss_parallel_cross_entropy(logits, labels.narrow(0, 2 * dp, 2), mesh.group("tp"), -100,
                                                   at::Reduction::Sum) * (2.0 / valid);
    const double global_loss = titan::dist_sum(loss.item<double>(), mesh.group("dp_shard")) / 2.0;
    INFO("step ", step);
    check_step(*model, *reference, opt, ref_opt, loss, ref_loss, global_loss);
    if (step == 0) titan::verify_calls(model);
  }
  check_parameters_match(*model, *reference, kAdamParamTol);
}
