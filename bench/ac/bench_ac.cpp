// bench_ac: memory and step time of activation checkpointing modes on a CPU transformer stack.
//
//   bench_ac [--dim 256] [--heads 8] [--hidden 1024] [--layers 8] [--batch 8] [--seq 256]
//            [--steps 3] [--threads 1]
//
// For each mode (none, full, selective every 2nd layer, selective per operator) it prints the
// bytes a step keeps for backward (allocated when forward returns), the step's peak allocation
// (forward + backward, gradients included; counted by a wrapping CPU allocator) and the median
// forward + backward time.
#include "ac_testing.hpp"

#include <titan/ac.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench_args.hpp"

namespace {

using titan_bench::int_arg;

double mib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  const auto block = titan_ac::BlockOptions()
                         .dim(int_arg(argc, argv, "--dim", 256))
                         .heads(int_arg(argc, argv, "--heads", 8))
                         .hidden(int_arg(argc, argv, "--hidden", 1024));
  const int64_t layers = int_arg(argc, argv, "--layers", 8), batch = int_arg(argc, argv, "--batch", 8),
                seq = int_arg(argc, argv, "--seq", 256), steps = int_arg(argc, argv, "--steps", 3);
  torch::set_num_threads(static_cast<int>(int_arg(argc, argv, "--threads", 1)));
  torch::manual_seed(0);
  const auto x = torch::randn({batch, seq, block.dim()});

  struct Mode {
    const char* label;
    titan::ActivationCheckpointOptions options;
  };
  const std::vector<Mode> modes = {
      {"none", titan::ActivationCheckpointOptions().mode(titan::AcMode::None)},
      {"full", titan::ActivationCheckpointOptions().mode(titan::AcMode::Full)},
      {"selective, every 2nd layer", titan::ActivationCheckpointOptions().mode(titan::AcMode::EveryKthLayer).every_k(2)},
      {"selective, per op", titan::ActivationCheckpointOptions().mode(titan::AcMode::PerOperator)},
      {"selective, per op, every mm", titan::ActivationCheckpointOptions().mode(titan::AcMode::PerOperator).every_other_ops({})},
  };
  std::printf("transformer stack: %lld layers, dim %lld, %lld heads, hidden %lld, batch %lld x seq %lld, %d thread(s)\n",
              static_cast<long long>(layers), static_cast<long long>(block.dim()),
              static_cast<long long>(block.heads()), static_cast<long long>(block.hidden()),
              static_cast<long long>(batch), static_cast<long long>(seq), torch::get_num_threads());
  std::printf("| mode | kept for backward (MiB) | step peak (MiB) | step time (ms, median of %lld) |\n",
              static_cast<long long>(steps));
  std::printf("|---|---:|---:|---:|\n");
  for (const auto& mode : modes) {
    torch::manual_seed(1);
    titan_ac::Stack model(layers, block);
    titan::apply_activation_checkpointing(model->layers, mode.options);
    const auto memory = titan_ac::measure_step(model, x);  // also the warm-up step
    std::vector<double> times;
    for (int64_t s = 0; s < steps; ++s) {
      model->zero_grad();
      const auto start = std::chrono::steady_clock::now();
      model->forward(x).pow(2).mean().backward();
      times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(times.begin(), times.end());
    std::printf("| %s | %.1f | %.1f | %.0f |\n", mode.label, mib(memory.saved), mib(memory.peak),
                times[times.size() / 2]);
  }
  return 0;
}
