// 2-D parallelism: tensor parallel inside, FSDP outside, on a (dp_shard, tp) = (2, 2) mesh of 4
// ranks. Each dp_shard rank trains on its half of the batch; the mean of their losses and the
// gathered parameters must match one process training the unsharded model on the whole batch.
#include "tiny_llama.hpp"
#include "tp_test_util.hpp"

#include <titan/fsdp.hpp>

TEST_CASE("tp: FSDP 2 x TP 2 with sequence and loss parallel matches the single-process run") {
  if (tp_test::tp_size() != 4) return;  // needs 4 ranks
  using namespace tp_test;
  TinyArgs a;
  torch::manual_seed(9);
  TinyLlama reference(a);
  torch::manual_seed(9);
  TinyLlama model(a);

  titan::DeviceMesh mesh(titan_test::world(), {"dp_shard", "tp"}, {2, 2});
  titan::parallelize_module(*model, mesh["tp"], titan::examples::llama_tp_plan(dims_of(a), 2));
  for (const auto& layer : *model->layers) titan::fully_shard(layer, mesh["dp_shard"]);
  titan::fully_shard(model, mesh["dp_shard"]);
  // A column-parallel weight: TP shards dim 0, FSDP shards the TP shard's dim 0 again.
  for (const auto& [name, tensor] : titan::sharded_parameters(*model))
    if (name == "layers.0.attention.wq.weight") CHECK(tensor.layout.placement() == "Shard(0)@tp,Shard(0)@dp_shard");

  auto options = torch::optim::AdamWOptions(1e-2).weight_decay(0.1);
  torch::optim::AdamW opt(model->parameters(), options), ref_opt(reference->parameters(), options);
  const int dp = mesh.coordinate("dp_shard");
  auto generator = at::make_generator<at::CPUGeneratorImpl>(77);
  for (int step = 0; step < 5; ++step) {
    auto tokens = at::randint(a.vocab, {4, 8}, generator, torch::kLong);  // the global batch
    auto labels = at::randint(a.vocab, {4, 8}, generator, torch::kLong);
    auto ref_loss = torch::cross_entropy_loss(reference->forward(tokens).flatten(0, 1), labels.flatten());
    auto logits = titan::call(model, tokens.narrow(0, 2 * dp, 2));  // this dp rank's half
    auto loss = titan::loss_parallel_cross_entropy(logits, labels.narrow(0, 2 * dp, 2), mesh.group("tp"));
    auto mean_loss = titan::detail::all_reduce_raw(loss.detach(), *mesh.group("dp_shard"), titan::ReduceOp::Avg);
    INFO("step ", step);
    tp_test::check_step(*model, *reference, opt, ref_opt, loss, ref_loss, mean_loss.item<double>());
  }
  check_parameters_match(*model, *reference, tp_test::kAdamParamTol);
}
