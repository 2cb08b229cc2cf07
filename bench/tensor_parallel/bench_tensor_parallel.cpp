// bench_tensor_parallel: per-rank parameter memory and training step time of the example Llama
// (examples/models/llama) sharded with the example TP plan at every TP degree dividing the world size.
// Each degree runs on its own (dp, tp) mesh of the same job; rank 0 prints one table row per degree.
//
//   titan_launch --nproc 4 -- bench_tensor_parallel [--family llama3] [--flavor debug] [--vocab 8192]
//                [--layers 4] [--kv-heads 8] [--batch 4] [--seq 128] [--steps 4] [--warmup 1]
#include <models/llama/parallelize.hpp>
#include <titan/meta.hpp>
#include <titan/tensor_parallel.hpp>
#include <titan/titan.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <string>

#include "bench_args.hpp"

namespace {

using titan_bench::int_arg;
using titan_bench::text_arg;

/// The largest value of `x` over the job.
double job_max(const titan::WorldPtr& world, double x) {
  auto t = torch::tensor({x}, torch::kDouble);
  if (world->world_size() > 1) {
    std::vector<torch::Tensor> buffer{t};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::MAX;
    world->group()->backend()->allreduce(buffer, options)->wait();
  }
  return t.item<double>();
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  auto args = titan::examples::model_args(text_arg(argc, argv, "--family", "llama3"),
                                          text_arg(argc, argv, "--flavor", "debug"))
                  .vocab_size(int_arg(argc, argv, "--vocab", 8192))
                  .n_layers(int_arg(argc, argv, "--layers", 4))
                  .n_kv_heads(int_arg(argc, argv, "--kv-heads", 8));
  const int64_t batch = int_arg(argc, argv, "--batch", 4), seq = int_arg(argc, argv, "--seq", 128);
  const int64_t steps = int_arg(argc, argv, "--steps", 4), warmup = int_arg(argc, argv, "--warmup", 1);
  auto world = titan::init_distributed();
  const int n = world->world_size();
  const double mib = 1024.0 * 1024.0;
  if (world->rank() == 0) {
    std::printf("model: %lld parameters (dim %lld, %lld layers, %lld heads, %lld kv heads, vocab %lld), fp32, "
                "batch %lld x seq %lld, %d ranks\n",
                static_cast<long long>(titan::examples::parameter_count(args)), static_cast<long long>(args.dim()),
                static_cast<long long>(args.n_layers()), static_cast<long long>(args.n_heads()),
                static_cast<long long>(args.n_kv_heads()), static_cast<long long>(args.vocab_size()),
                static_cast<long long>(batch), static_cast<long long>(seq), n);
    std::printf("| TP | params/rank | param MiB/rank | +grads+AdamW MiB/rank | step ms (max rank) |\n");
    std::printf("|----|-------------|----------------|-----------------------|--------------------|\n");
  }
  for (int tp = 1; tp <= n; tp *= 2) {
    if (n % tp != 0) continue;
    titan::DeviceMesh mesh(world, {"dp", "tp"}, {n / tp, tp});
    titan::examples::Transformer model(args, torch::kMeta);
    titan::parallelize_module(*model, mesh["tp"],
                              titan::examples::llama_tp_plan(titan::examples::tp_dims(args), tp,
                                                             titan::examples::TpPlanOptions()));
    titan::to_empty(*model, torch::kCPU);
    titan::examples::init_weights(*model, 0);
    int64_t numel = 0, bytes = 0;
    for (const auto& p : model->parameters()) {
      numel += p.numel();
      bytes += p.numel() * static_cast<int64_t>(p.element_size());
    }
    torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(1e-4));
    auto tokens = torch::randint(args.vocab_size(), {batch, seq + 1});  // same on every rank (same seed)
    auto input = tokens.narrow(1, 0, seq), labels = tokens.narrow(1, 1, seq);
    double total_ms = 0.0;
    for (int64_t step = 0; step < warmup + steps; ++step) {
      world->group()->barrier();
      auto start = std::chrono::steady_clock::now();
      optimizer.zero_grad();
      titan::loss_parallel_cross_entropy(titan::call(model, input), labels, mesh.group("tp")).backward();
      optimizer.step();
      auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      if (step >= warmup) total_ms += ms;
    }
    const double step_ms = job_max(world, total_ms / static_cast<double>(steps));
    int64_t training_bytes = bytes;  // parameters + gradients + AdamW's moments, as held after a step
    for (const auto& p : model->parameters()) training_bytes += p.grad().nbytes();
    for (const auto& item : optimizer.state()) {
      const auto& state = static_cast<const torch::optim::AdamWParamState&>(*item.second);
      training_bytes += state.exp_avg().nbytes() + state.exp_avg_sq().nbytes();
    }
    if (world->rank() == 0)
      std::printf("| %2d | %11lld | %14.2f | %21.2f | %18.1f |\n", tp, static_cast<long long>(numel),
                  static_cast<double>(bytes) / mib, static_cast<double>(training_bytes) / mib, step_ms);
  }
  world->shutdown();
  return 0;
}
