// bench_pipeline: what each pipeline schedule costs on this machine's CPU ranks. For GPipe, 1F1B,
// Interleaved1F1B (2 stages per rank) and ZBH1 over all ranks of the job it trains a stack of
// residual MLP blocks and reports, per schedule, the measured bubble (1 - time in passes / step
// time, averaged over ranks, median step) next to the textbook formula and titan's simulation of
// the same table with measured pass costs, and the peak heap growth during a step on each rank
// (the activations held: GPipe holds all m micro-batches, 1F1B at most p - r on rank r) with the
// most micro-batches held at once.
//
//   titan_launch --nproc 2 -- bench_pipeline [--microbatches 8] [--rows 4] [--seq 64] [--dim 256]
//                [--hidden 1024] [--layers 8] [--steps 5] [--warmup 1]
#include <titan/fsdp.hpp>
#include <titan/pipeline.hpp>
#include <titan/titan.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

#include "bench_args.hpp"
#include "bench_measure.hpp"

namespace {

using titan_bench::heap_bytes;
using titan_bench::int_arg;
using titan_bench::median;
using titan_bench::text_arg;

struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t dim, int64_t hidden) {
    up = register_module("up", torch::nn::Linear(dim, hidden));
    down = register_module("down", torch::nn::Linear(hidden, dim));
  }
  torch::Tensor forward(const torch::Tensor& x) {  // [B, S, dim]
    return x + titan::call(down, torch::gelu(titan::call(up, x)));
  }
  torch::nn::Linear up{nullptr}, down{nullptr};
};
TORCH_MODULE(Block);

/// Embedding, blocks, head; a pipeline stage skips what it does not hold.
struct StackImpl : torch::nn::Module {
  StackImpl(int64_t vocab, int64_t dim, int64_t hidden, int64_t layers) {
    embed = register_module("embed", torch::nn::Embedding(vocab, dim));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int64_t i = 0; i < layers; ++i) blocks->push_back(Block(dim, hidden));
    head = register_module("head", torch::nn::Linear(dim, vocab));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto children = named_children();
    auto h = children.contains("embed") ? titan::call(embed, x) : x;  // [B, S, dim]
    for (const auto& block : blocks->children()) h = titan::call(block->as<BlockImpl>(), h);
    return children.contains("head") ? titan::call(head, h) : h;  // [B, S, vocab]
  }
  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(Stack);

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  const int64_t m = int_arg(argc, argv, "--microbatches", 8), rows = int_arg(argc, argv, "--rows", 4);
  const int64_t seq = int_arg(argc, argv, "--seq", 64), dim = int_arg(argc, argv, "--dim", 256);
  const int64_t hidden = int_arg(argc, argv, "--hidden", 1024), layers = int_arg(argc, argv, "--layers", 8);
  const int64_t steps = int_arg(argc, argv, "--steps", 5), warmup = int_arg(argc, argv, "--warmup", 1);
  const int64_t vocab = 512;
  auto world = titan::init_distributed();
  const auto group = world->group();
  const int64_t p = world->world_size(), rank = world->rank();
  if (rank == 0)
    std::printf("pipeline benchmark: %lld ranks (Gloo, CPU, 1 thread each), %lld micro-batches of %lld x %lld tokens, "
                "%lld blocks of dim %lld / hidden %lld, fp32; %lld steps after %lld warm-up\n\n",
                static_cast<long long>(p), static_cast<long long>(m), static_cast<long long>(rows),
                static_cast<long long>(seq), static_cast<long long>(layers), static_cast<long long>(dim),
                static_cast<long long>(hidden), static_cast<long long>(steps), static_cast<long long>(warmup));
  if (rank == 0)
    std::printf("| schedule | stages | bubble measured | bubble formula | bubble simulated | step ms | pass ms: F, B (I + W) "
                "| peak MB per rank (held micro-batches) |\n|---|---|---|---|---|---|---|---|\n");
  const auto split = titan::PipelineSplit().first({"embed"}).layers("blocks").last({"head"});
  for (auto kind : {titan::PipelineScheduleKind::GPipe, titan::PipelineScheduleKind::OneFOneB,
                    titan::PipelineScheduleKind::Interleaved1F1B, titan::PipelineScheduleKind::ZeroBubbleH1}) {
    const int64_t v = titan::is_multi_stage(kind) ? 2 : 1;
    if (layers < p * v || (v > 1 && m % p != 0)) continue;
    std::vector<titan::PipelineStage> stages;
    std::vector<torch::Tensor> params;
    for (int64_t i = 0; i < v; ++i) {
      torch::manual_seed(0);
      Stack stage(vocab, dim, hidden, layers);
      titan::keep_pipeline_stage(*stage, split, p * v, rank + i * p);
      auto module = stage.ptr();
      stages.emplace_back(rank + i * p, module, [module](const torch::Tensor& x) { return titan::call(*module, x); });
      for (const auto& q : module->parameters()) params.push_back(q);
    }
    double peak = 0, base = 0;
    titan::Pipeline pipeline(group, stages, titan::PipelineOptions().schedule(kind).microbatches(m).after_action(
                                                [&](const titan::PipelineAction&) { peak = std::max(peak, heap_bytes()); }));
    torch::optim::SGD opt(params, 1e-3);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
    std::vector<torch::Tensor> inputs, targets;
    for (int64_t k = 0; k < m; ++k) {
      inputs.push_back(torch::randint(vocab, {rows, seq}, gen, torch::kLong));
      targets.push_back(torch::randint(vocab, {rows, seq}, gen, torch::kLong));
    }
    auto loss = [&](const torch::Tensor& logits, int64_t k) {  // logits [rows, S, vocab]; the schedule divides by m
      return torch::nn::functional::cross_entropy(logits.flatten(0, 1), targets[static_cast<size_t>(k)].flatten());
    };
    std::vector<double> bubbles, step_ms, growth;
    titan::PipelineStats last;
    for (int64_t s = 0; s < warmup + steps; ++s) {
      opt.zero_grad();
      group->barrier();
      base = heap_bytes();
      peak = base;
      pipeline.step(inputs, loss);
      opt.step();
      if (s < warmup) continue;
      last = pipeline.stats();
      const double idle = 1.0 - last.compute_seconds / std::max(last.step_seconds, 1e-12);
      bubbles.push_back(titan::dist_sum(idle, group) / static_cast<double>(p));
      step_ms.push_back(titan::dist_max(last.step_seconds, group) * 1e3);
      growth.push_back(peak - base);
    }
    // Simulation of the same table with this run's mean pass costs (a full backward split evenly
    // into its input and weight parts).
    const double passes = static_cast<double>(m * p * v);
    const double forward = titan::dist_sum(last.forward_seconds, group) / passes;
    const double full = titan::dist_sum(last.backward_seconds, group) / passes;
    const bool split_backward = kind == titan::PipelineScheduleKind::ZeroBubbleH1;
    const double input = split_backward ? titan::dist_sum(last.input_seconds, group) / passes : full / 2;
    const double weight = split_backward ? titan::dist_sum(last.weight_seconds, group) / passes : full / 2;
    auto sim = titan::simulate_schedule(pipeline.schedule(), forward, input, weight);
    // 1F1B and GPipe: (p - 1) / (m + p - 1); interleaved: (p - 1) / (v m + p - 1); ZB-H1 has no
    // closed form here (its simulation with measured costs stands in).
    const std::string formula =
        split_backward ? "-"
                       : c10::str(double(p - 1) / double((kind == titan::PipelineScheduleKind::Interleaved1F1B ? v : 1) * m + p - 1))
                             .substr(0, 5);
    const auto peaks = titan::all_gather_strings(
        group, c10::str(static_cast<int64_t>(median(growth) / 1e6), " (", last.peak_live, ")"));
    if (rank == 0) {
      std::string per_rank;
      for (size_t r = 0; r < peaks.size(); ++r) per_rank += (r ? ", " : "") + peaks[r];
      char passes[96];
      if (split_backward)
        std::snprintf(passes, sizeof(passes), "%.1f, %.1f (%.1f + %.1f)", forward * 1e3, (input + weight) * 1e3,
                      input * 1e3, weight * 1e3);
      else
        std::snprintf(passes, sizeof(passes), "%.1f, %.1f", forward * 1e3, full * 1e3);
      std::printf("| %s | %lld x %lld | %.3f | %s | %.3f | %.1f | %s | %s |\n", titan::schedule_name(kind).c_str(),
                  static_cast<long long>(p), static_cast<long long>(v), median(bubbles), formula.c_str(), sim.bubble(),
                  median(step_ms), passes, per_rank.c_str());
    }
  }
  world->shutdown();
  return 0;
}
