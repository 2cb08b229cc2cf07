// bench_context_parallel: what context parallelism saves and costs on this machine's CPU ranks.
// For each sequence length and cp in {1, 2, 4} (up to the job's ranks; the first cp ranks form the
// group, the others wait), one training step of a small decoder (pre-norm blocks: GQA attention
// through titan::context_parallel_attention, SwiGLU-free MLP) on one sequence sharded with the
// load-balanced layout. Reported per rank: the activations the forward leaves for the backward
// (heap growth from before the forward to after it, the largest over the group's ranks), its ratio
// to cp 1 (1/cp expected), and the median step time (forward + backward).
//
//   titan_launch --nproc 4 -- bench_context_parallel [--seqs 2048,4096,8192,16384] [--dim 64]
//                [--heads 2] [--kv-heads 1] [--layers 2] [--steps 2] [--rotate allgather|p2p]
#include <titan/context_parallel.hpp>
#include <titan/titan.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>

#include "bench_args.hpp"
#include "bench_measure.hpp"

namespace {

using titan_bench::heap_bytes;
using titan_bench::int_arg;
using titan_bench::median;
using titan_bench::text_arg;

struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t dim, int64_t heads, int64_t kv_heads) : heads(heads), kv_heads(kv_heads), head_dim(dim / heads) {
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    wq = register_module("wq", torch::nn::Linear(torch::nn::LinearOptions(dim, dim).bias(false)));
    wkv = register_module("wkv", torch::nn::Linear(torch::nn::LinearOptions(dim, 2 * kv_heads * head_dim).bias(false)));
    wo = register_module("wo", torch::nn::Linear(torch::nn::LinearOptions(dim, dim).bias(false)));
    up = register_module("up", torch::nn::Linear(dim, 4 * dim));
    down = register_module("down", torch::nn::Linear(4 * dim, dim));
  }
  torch::Tensor forward(const torch::Tensor& x, const titan::ProcessGroupPtr& group,
                        const titan::ContextParallelOptions& options) {
    const int64_t b = x.size(0), s = x.size(1);                              // x [B, S/cp, dim]
    auto h = norm(x);
    auto q = wq(h).view({b, s, heads, head_dim}).transpose(1, 2);            // [B, H, S/cp, hd]
    auto kv = wkv(h).view({b, s, 2, kv_heads, head_dim}).permute({2, 0, 3, 1, 4});  // [2, B, Hkv, S/cp, hd]
    auto a = titan::context_parallel_attention(q, kv[0], kv[1], group, options);     // [B, H, S/cp, hd]
    auto y = x + wo(a.transpose(1, 2).reshape({b, s, -1}));
    return y + down(torch::gelu(up(norm(y))));
  }
  int64_t heads, kv_heads, head_dim;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear wq{nullptr}, wkv{nullptr}, wo{nullptr}, up{nullptr}, down{nullptr};
};
TORCH_MODULE(Block);

std::vector<int64_t> int_list(const std::string& text) {
  std::vector<int64_t> values;
  std::stringstream list(text);
  for (std::string item; std::getline(list, item, ',');) values.push_back(std::stoll(item));
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  const auto seqs = int_list(text_arg(argc, argv, "--seqs", "2048,4096,8192,16384"));
  const int64_t dim = int_arg(argc, argv, "--dim", 64), heads = int_arg(argc, argv, "--heads", 2);
  const int64_t kv_heads = int_arg(argc, argv, "--kv-heads", 1), layers = int_arg(argc, argv, "--layers", 2);
  const int64_t steps = int_arg(argc, argv, "--steps", 2);
  const auto rotate = titan::parse_rotate_method(text_arg(argc, argv, "--rotate", "allgather"));
  auto world = titan::init_distributed();
  const int64_t n = world->world_size(), rank = world->rank();
  if (rank == 0)
    std::printf("context-parallel benchmark: %lld ranks (Gloo, CPU, 1 thread each), %lld blocks of dim %lld, %lld "
                "query / %lld key-value heads, fp32, batch 1, rotate %s; median of %lld steps after 1 warm-up\n\n"
                "| seq | cp | tokens per rank | activations MB per rank | vs cp 1 | step ms |\n|---|---|---|---|---|---|\n",
                static_cast<long long>(n), static_cast<long long>(layers), static_cast<long long>(dim),
                static_cast<long long>(heads), static_cast<long long>(kv_heads),
                titan::rotate_method_name(rotate).c_str(), static_cast<long long>(steps));
  torch::manual_seed(0);
  torch::nn::ModuleList model;
  for (int64_t l = 0; l < layers; ++l) model->push_back(Block(dim, heads, kv_heads));
  const auto options = titan::ContextParallelOptions().rotate_method(rotate);
  std::map<int64_t, titan::ProcessGroupPtr> groups;  // cp -> the first cp ranks (nullptr on the others)
  for (int64_t cp = 1; cp <= n; cp *= 2) {
    std::vector<int> members(static_cast<size_t>(cp));
    for (int64_t r = 0; r < cp; ++r) members[static_cast<size_t>(r)] = static_cast<int>(r);
    groups[cp] = world->new_group(members, "cp" + std::to_string(cp));
  }
  for (const int64_t seq : seqs) {
    double base_activations = 0;
    for (const auto& [cp, group] : groups) {
      double activations = 0, step_ms = 0;
      if (rank < cp) {
        const titan::ContextParallelLayout layout(cp, rank);
        auto x = layout.shard(torch::randn({1, seq, dim}), 1);  // [1, S/cp, dim]
        std::vector<double> times, growth;
        for (int64_t step = 0; step <= steps; ++step) {
          model->zero_grad();
          group->barrier();
          const double before = heap_bytes();
          const auto start = std::chrono::steady_clock::now();
          auto h = x;
          for (const auto& block : model->children()) h = block->as<BlockImpl>()->forward(h, group, options);
          const double after = heap_bytes();
          h.square().mean().backward();
          group->barrier();
          const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
          if (step == 0) continue;  // warm-up
          times.push_back(ms);
          growth.push_back(after - before);
        }
        activations = titan::dist_max(median(growth), group);
        step_ms = titan::dist_max(median(times), group);
      }
      world->group()->barrier();
      if (rank == 0) {
        if (cp == 1) base_activations = activations;
        std::printf("| %lld | %lld | %lld | %.1f | %.2f | %.0f |\n", static_cast<long long>(seq),
                    static_cast<long long>(cp), static_cast<long long>(seq / cp), activations / 1e6,
                    activations / base_activations, step_ms);
        std::fflush(stdout);
      }
    }
  }
  world->shutdown();
  return 0;
}
