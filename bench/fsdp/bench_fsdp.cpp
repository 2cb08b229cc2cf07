// bench_fsdp: training step time and peak memory of a transformer-like stack of MLP blocks
// sharded with titan::fully_shard (or left plain with --plain), one line per job from rank 0.
// The same model is run with PyTorch's FSDP2 by fsdp2_reference.py; bench/fsdp/run.sh runs both.
//
//   titan_launch --nproc 4 -- bench_fsdp [--dim 512] [--hidden 2048] [--depth 8] [--batch 32]
//                                         [--steps 6] [--warmup 2] [--plain]
#include <titan/fsdp.hpp>
#include <titan/titan.hpp>
#include <torch/torch.h>

#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <string>

#include "bench_args.hpp"

namespace {

/// Pre-norm residual MLP block: x + W2 tanh(W1 (g * x) + b1) + b2.
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t dim, int64_t hidden) {
    norm = register_parameter("norm", torch::ones({dim}));
    up = register_module("up", torch::nn::Linear(dim, hidden));
    down = register_module("down", torch::nn::Linear(hidden, dim));
  }
  torch::Tensor forward(const torch::Tensor& x) {  // [B, dim]
    return x + down->forward(torch::tanh(up->forward(x * norm)));
  }
  torch::Tensor norm;
  torch::nn::Linear up{nullptr}, down{nullptr};
};
TORCH_MODULE(Block);

struct StackImpl : torch::nn::Module {
  StackImpl(int64_t dim, int64_t hidden, int64_t depth) {
    embed = register_module("embed", torch::nn::Linear(dim, dim));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < depth; ++i) layers->push_back(Block(dim, hidden));
    head = register_module("head", torch::nn::Linear(dim, dim));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = embed->forward(x);
    for (const auto& layer : *layers) h = titan::call(layer->as<BlockImpl>(), h);
    return head->forward(h);
  }
  torch::nn::Linear embed{nullptr}, head{nullptr};
  torch::nn::ModuleList layers{nullptr};
};
TORCH_MODULE(Stack);

using titan_bench::has_flag;
using titan_bench::int_arg;

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  const int64_t dim = int_arg(argc, argv, "--dim", 512), hidden = int_arg(argc, argv, "--hidden", 2048);
  const int64_t depth = int_arg(argc, argv, "--depth", 8), batch = int_arg(argc, argv, "--batch", 32);
  const int64_t steps = int_arg(argc, argv, "--steps", 6), warmup = int_arg(argc, argv, "--warmup", 2);
  const bool plain = has_flag(argc, argv, "--plain");
  auto world = titan::init_distributed();
  const int n = world->world_size();
  TORCH_CHECK(batch % n == 0, "bench_fsdp: --batch ", batch, " must be divisible by the world size ", n);
  TORCH_CHECK(!plain || n == 1, "bench_fsdp: --plain runs on one rank");

  torch::manual_seed(0);
  Stack model(dim, hidden, depth);
  titan::DeviceMesh mesh(world, {"dp_shard"}, {n});
  if (!plain) {
    for (const auto& layer : *model->layers) titan::fully_shard(layer, mesh);
    titan::fully_shard(model, mesh);
  }
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(1e-4));
  auto x = torch::randn({batch / n, dim});  // [B / n, dim]: this rank's slice of the global batch
  auto y = torch::randn({batch / n, dim});

  double total_ms = 0.0;
  for (int64_t step = 0; step < warmup + steps; ++step) {
    world->group()->barrier();
    auto start = std::chrono::steady_clock::now();
    optimizer.zero_grad();
    torch::mse_loss(titan::call(model, x), y).backward();
    optimizer.step();
    auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (step >= warmup) total_ms += ms;
  }
  auto memory = titan::memory_usage(*model, &optimizer);
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  // The slowest rank's step time and the largest peak RSS (ru_maxrss is in KiB on Linux).
  auto stats = torch::tensor({total_ms / static_cast<double>(steps), static_cast<double>(usage.ru_maxrss) / 1024.0,
                              static_cast<double>(memory.param_bytes + memory.grad_bytes + memory.optimizer_state_bytes) /
                                  (1024.0 * 1024.0)},
                             torch::kDouble);
  if (n > 1) {
    std::vector<torch::Tensor> buffer{stats};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::MAX;
    world->group()->backend()->allreduce(buffer, options)->wait();
  }
  auto s = stats.accessor<double, 1>();
  if (world->rank() == 0)
    std::printf("| titan %-6s | %d | %8.1f | %9.0f | %9.1f |\n", plain ? "plain" : "fsdp", n, s[0], s[1], s[2]);
  world->shutdown();
  return 0;
}
