// Time to initialise rank 0's FSDP shard of every parameter of a model flavor with init_weights'
// rule (init_parameter), for each given shard count N. N = 1 is what every rank drew before
// init_weights drew only the tiles of its own blocks: the whole model. Parameters are done one at
// a time (nothing else is held), so the 8B model runs in a few GiB. The layouts use a stand-in
// group of N ranks (no processes: only rank 0's blocks are computed).
//
//   bench_init [--model llama3] [--flavor 8B] [--ranks 1,8,64] [--threads 2]
//
// Prints one table: ranks, rank 0's share in GiB (fp32), seconds, and the speed-up over the
// first count given.
#include "models/llama/model.hpp"

#include <titan/sharding.hpp>

#include <chrono>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "bench_args.hpp"

using titan_bench::text_arg;

int main(int argc, char** argv) {
  using namespace titan::examples;
  torch::set_num_threads(std::stoi(text_arg(argc, argv, "--threads", "2")));
  const auto args = model_args(text_arg(argc, argv, "--model", "llama3"), text_arg(argc, argv, "--flavor", "8B"));
  std::vector<int> counts;
  std::stringstream list(text_arg(argc, argv, "--ranks", "1,8,64"));
  for (std::string item; std::getline(list, item, ',');) counts.push_back(std::stoi(item));

  Transformer model(args, torch::kMeta);  // names and global shapes only
  std::printf("| model | ranks | rank 0 GiB | seconds | speed-up vs the first |\n|-------|-------|------------|---------|-----------|\n");
  double whole = 0.0;
  for (int n : counts) {
    std::vector<int> members(static_cast<size_t>(n));
    for (int r = 0; r < n; ++r) members[static_cast<size_t>(r)] = r;
    auto group = std::make_shared<const titan::ProcessGroup>(nullptr, members, 0, c10::Device(c10::kCPU));
    double seconds = 0.0, bytes = 0.0;
    for (const auto& item : model->named_parameters()) {
      titan::TensorLayout layout{item.value().sizes().vec(), {titan::ShardLevel{0, "dp_shard", group, {}}}};
      auto local = torch::empty(layout.local_shape(), torch::kFloat);  // rank 0's shard
      const auto start = std::chrono::steady_clock::now();
      init_parameter(item.key(), layout, local, args, 0);
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      bytes += static_cast<double>(local.numel()) * 4.0;
    }
    if (n == counts.front()) whole = seconds;
    std::printf("| %s %s | %d | %.2f | %.2f | %.1fx |\n", text_arg(argc, argv, "--model", "llama3").c_str(),
                text_arg(argc, argv, "--flavor", "8B").c_str(), n, bytes / (1 << 30), seconds,
                whole / seconds);
    std::fflush(stdout);
  }
  return 0;
}
