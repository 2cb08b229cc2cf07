// bench_checkpoint: save and load throughput of titan/checkpoint.hpp, sync vs async, and the
// training stall each causes, with the state on the job's device (TITAN_DEVICE=cuda: on the GPU,
// staged through pinned host memory).
//
//   bench_checkpoint [--params N] [--dir DIR] [--steps S] [--io-threads T]
//   titan_launch --nproc 2 -- bench_checkpoint ...     (each rank holds 1/world of every tensor)
//
// The state is N fp32 parameters (default 1e9 = 4 GB) in [4096, 4096]-row tensors sharded along
// dim 0 across the ranks. If free memory (3x the state) or disk (2x) is short, N is reduced and
// the table says so. The load reads from the disk (the files are dropped from the page cache
// first). A "training step" is a fixed matmul workload; the stall of a save is the
// extra time of the step that saves, and for async saves also the slowdown of the steps that run
// while the background thread writes (as a share of their time). The async save's blocked time is
// compared with a plain copy of the same bytes into preallocated host memory (pinned from a GPU),
// timed in the same run: the floor of a save that must snapshot the state.
#include <titan/checkpoint.hpp>
#include <titan/safetensors.hpp>
#include <titan/tasks.hpp>
#include <titan/dist.hpp>
#include <torch/cuda.h>
#include <fcntl.h>
#include <unistd.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// MemAvailable of /proc/meminfo in bytes.
int64_t available_memory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

/// Asks the kernel to drop `path`'s pages from the page cache (they are on disk: saves fsync).
void drop_from_page_cache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

/// A fixed amount of compute standing in for a training step (finished on the device when timed).
/// Every step starts from the same `b`: a chain carried across steps decays (a's spectral radius
/// is below 1) into subnormal floats, whose matmuls run ~100x slower on AVX-512 CPUs, and the
/// stall of whichever phase it reached would be that slowdown, not the save's.
double train_step(const torch::Tensor& a, const torch::Tensor& b) {
  auto start = Clock::now();
  auto x = b;
  for (int i = 0; i < 8; ++i) x = torch::tanh(torch::mm(a, x));  // [512, 512] (CPU) or [4096, 4096] (GPU)
  if (b.is_cuda()) torch::cuda::synchronize(b.device().index());
  return seconds_since(start);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t params = 1000000000;
  std::string dir = (std::filesystem::temp_directory_path() / "titan_bench_checkpoint").string();
  int steps = 20, io_threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--params") params = std::stoll(argv[i + 1]);
    else if (flag == "--dir") dir = argv[i + 1];
    else if (flag == "--steps") steps = std::stoi(argv[i + 1]);
    else if (flag == "--io-threads") io_threads = std::stoi(argv[i + 1]);
    else {
      std::cerr << "usage: bench_checkpoint [--params N] [--dir DIR] [--steps S] [--io-threads T]\n";
      return 2;
    }
  }
  torch::set_num_threads(1);
  auto world = titan::init_distributed();
  const int ranks = world->world_size();
  titan::DeviceMesh mesh(world, {"dp_shard"}, {ranks});
  const auto device = world->device();

  // Fit the state into memory (state + async staging copy + load staging) and disk (two steps).
  const int64_t requested = params;
  std::filesystem::create_directories(dir);
  const int64_t free_disk = static_cast<int64_t>(std::filesystem::space(dir).available);
  const int64_t free_memory = available_memory();
  while (params > 1000000 && (params * 4 * 3 > free_memory || params * 4 * 2 > free_disk)) params /= 2;
  const int64_t rows = 4096, cols = 4096;
  const int64_t tensor_params = rows * cols;
  const int64_t count = std::max<int64_t>(1, params / tensor_params);
  params = count * tensor_params;

  titan::TrainState state;
  torch::manual_seed(0);
  for (int64_t i = 0; i < count; ++i) {
    titan::TensorLayout layout{{rows, cols}, {{0, "dp_shard", mesh.group("dp_shard"), {}}}};
    auto name = "layers." + std::to_string(i) + ".weight";
    state.tensors.emplace_back(name, titan::make_sharded(name, torch::randn(layout.local_shape(), device), layout));  // [rows/ranks, cols]
  }
  const double gb = static_cast<double>(params) * 4 / 1e9;
  world->logger().info("state: ", params, " fp32 parameters (", gb, " GB) in ", count, " tensors over ", ranks,
                       " ranks on ", device, params < requested ? " (reduced from the requested size: memory/disk)" : "");

  const int64_t work = device.is_cuda() ? 4096 : 512;  // a step of tens of ms on an H100 or a CPU core
  auto a = torch::randn({work, work}, device).div(std::sqrt(static_cast<double>(work)) * 1.5);
  auto b = torch::randn({work, work}, device);
  // Baseline step time: the mean of `steps` steps, measured again right before each async save (the
  // clock of a shared VM drifts by more than the stall being measured).
  const auto measure_baseline = [&] {
    double seconds = 0;
    for (int s = 0; s < steps; ++s) seconds += train_step(a, b);
    return seconds / steps;
  };
  double baseline = measure_baseline();

  // The floor of a snapshot: one copy of the state into preallocated host memory (the second of
  // two, so the buffers are touched; pinned from a GPU, as the staging is).
  std::vector<torch::Tensor> host;
  for (const auto& [name, tensor] : state.tensors)
    host.push_back(torch::empty_like(tensor.local, torch::TensorOptions().device(torch::kCPU).pinned_memory(device.is_cuda())));
  double memcpy_time = 0;
  for (int pass = 0; pass < 2; ++pass) {
    auto start = Clock::now();
    for (size_t i = 0; i < host.size(); ++i) host[i].copy_(state.tensors[i].second.local, /*non_blocking=*/device.is_cuda());
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
    memcpy_time = seconds_since(start);
  }
  host.clear();

  struct Row {
    std::string mode;
    double blocked = 0;   // seconds save() blocked the training loop
    double total = 0;     // seconds until the checkpoint was complete on disk
    double slowdown = 0;  // extra seconds of the steps run while the background write went on
    double overlapped = 0;  // seconds of those steps
  };
  std::vector<Row> rows_out;
  for (bool async : {false, true}) {
    titan::detail::remove_tree(dir + (async ? "/async" : "/sync"));
    titan::CheckpointManager manager(
        world, titan::CheckpointOptions(dir + (async ? "/async" : "/sync")).async(async).keep_latest_k(1).io_threads(io_threads));
    // Async saves twice: the second copies into the first one's host buffers (reuse_staging).
    for (int step = 1; step <= (async ? 2 : 1); ++step) {
      if (async) baseline = measure_baseline();
      world->group()->barrier();
      Row row{!async ? "sync" : step == 1 ? "async" : "async 2"};
      auto start = Clock::now();
      manager.save(step, state);
      row.blocked = seconds_since(start);
      // Keep training until the write is done (async); count the extra time over the baseline.
      int overlapped = 0;
      double overlapped_time = 0;
      while (manager.saving()) {
        overlapped_time += train_step(a, b);
        ++overlapped;
      }
      manager.wait();
      world->group()->barrier();
      row.total = seconds_since(start);
      row.slowdown = overlapped_time - overlapped * baseline;
      row.overlapped = overlapped_time;
      rows_out.push_back(row);
    }
  }

  // Load into fresh tensors, from the disk: the saved files leave the page cache first (the later
  // saves may or may not have pushed them out; dcp_reference.py does the same).
  if (world->rank() == 0)
    for (const auto& entry : std::filesystem::recursive_directory_iterator(dir + "/sync"))
      if (entry.is_regular_file()) drop_from_page_cache(entry.path().string());
  titan::TrainState target;
  for (const auto& [name, tensor] : state.tensors)
    target.tensors.emplace_back(name, titan::ShardedTensor{torch::zeros_like(tensor.local), tensor.layout, tensor.blocks});
  titan::CheckpointManager loader(world, titan::CheckpointOptions(dir + "/sync").io_threads(io_threads));
  world->group()->barrier();
  auto start = Clock::now();
  loader.load_latest(target);
  world->group()->barrier();
  const double load_time = seconds_since(start);
  bool equal = true;
  for (size_t i = 0; i < state.tensors.size(); ++i)
    equal = equal && torch::equal(state.tensors[i].second.local, target.tensors[i].second.local);
  TORCH_CHECK(equal, "bench_checkpoint: the loaded tensors differ from the saved ones");

  // The load's parts timed apart, on rank 0 over the whole checkpoint (with one rank exactly what
  // the load reads): read (the shard files from the disk, cold, in 8 MiB positioned reads on the
  // load's threads), verify (CRC-32 of as many bytes in memory, on those threads) and apply (one
  // copy of the state: the memcpy above). The load runs read and verify together per piece.
  const int threads = io_threads > 0 ? io_threads : titan::default_io_threads();
  double read_time = 0, verify_time = 0, read_gb = 0;
  if (world->rank() == 0) {
    constexpr int64_t kPiece = int64_t{8} << 20;
    std::vector<std::unique_ptr<titan::detail::PosixFile>> files;
    std::vector<std::pair<size_t, int64_t>> pieces;  // (file, offset)
    for (const auto& entry : std::filesystem::recursive_directory_iterator(dir + "/sync")) {
      if (!entry.is_regular_file() || entry.path().extension() != ".safetensors") continue;
      drop_from_page_cache(entry.path().string());
      files.push_back(std::make_unique<titan::detail::PosixFile>(entry.path().string(), O_RDONLY));
      for (int64_t offset = 0; offset < files.back()->size(); offset += kPiece) pieces.emplace_back(files.size() - 1, offset);
      read_gb += static_cast<double>(files.back()->size()) / 1e9;
    }
    auto read_start = Clock::now();
    titan::detail::run_tasks(threads, pieces.size(), [&](size_t k) {
      thread_local std::vector<uint8_t> buffer(kPiece);
      const auto& file = *files[pieces[k].first];
      const int64_t bytes = std::min(kPiece, file.size() - pieces[k].second);
      TORCH_CHECK(file.read_at(buffer.data(), static_cast<size_t>(bytes), pieces[k].second), "bench_checkpoint: short read");
    });
    read_time = seconds_since(read_start);
    std::vector<std::pair<const uint8_t*, int64_t>> chunks;  // the state's bytes in 8 MiB chunks
    std::vector<torch::Tensor> host;                          // a GPU state's bytes, on the host
    for (const auto& [name, tensor] : state.tensors) {
      host.push_back(tensor.local.cpu());
      const auto* data = static_cast<const uint8_t*>(host.back().data_ptr());
      const int64_t bytes = host.back().numel() * static_cast<int64_t>(host.back().element_size());
      for (int64_t offset = 0; offset < bytes; offset += kPiece) chunks.emplace_back(data + offset, std::min(kPiece, bytes - offset));
    }
    std::vector<uint32_t> crcs(chunks.size());
    auto verify_start = Clock::now();
    titan::detail::run_tasks(threads, chunks.size(), [&](size_t k) {
      crcs[k] = titan::detail::crc32(chunks[k].first, static_cast<size_t>(chunks[k].second));
    });
    verify_time = seconds_since(verify_start);
  }

  // Hugging Face export and import of the same tensors (each rank its local ones, as whole
  // tensors): safetensors::save_sharded (5 GB files, then fsynced, as the checkpoint is) and
  // safetensors::Reader::read of every tensor from the disk.
  const std::string hf = dir + "/hf-rank" + std::to_string(world->rank());
  titan::detail::remove_tree(hf);
  std::filesystem::create_directories(hf);
  titan::safetensors::NamedTensors named;
  for (const auto& [name, tensor] : state.tensors) named.emplace_back(name, tensor.local);
  world->group()->barrier();
  start = Clock::now();
  for (const auto& file :
       titan::safetensors::save_sharded(hf, named, titan::safetensors::SaveOptions().max_shard_bytes(5000000000LL).io_threads(io_threads)))
    titan::detail::PosixFile(hf + "/" + file, O_RDONLY).sync();
  titan::detail::sync_directory(hf);
  world->group()->barrier();
  const double export_time = seconds_since(start);
  for (const auto& entry : std::filesystem::directory_iterator(hf)) drop_from_page_cache(entry.path().string());
  world->group()->barrier();
  start = Clock::now();
  {
    titan::safetensors::Reader reader(hf);
    for (const auto& [name, tensor] : state.tensors)
      TORCH_CHECK(torch::equal(reader.read(name), tensor.local.cpu()), "bench_checkpoint: HF import of '", name, "' differs");
  }
  world->group()->barrier();
  const double import_time = seconds_since(start);
  titan::detail::remove_tree(hf);

  if (world->rank() == 0) {
    std::printf("\ncheckpoint of %.2f GB (%lld fp32 params, %lld tensors) on %d rank(s) (%s), dir %s\n", gb,
                static_cast<long long>(params), static_cast<long long>(count), ranks, device.str().c_str(), dir.c_str());
    std::printf("baseline training step: %.1f ms; I/O threads per rank: %d\n", baseline * 1e3, threads);
    std::printf("copy of the state into preallocated host memory (memcpy): %.2f s (%.2f GB/s)\n\n", memcpy_time,
                gb / memcpy_time);
    std::printf("| operation   | blocks training (s) | complete (s) | throughput (GB/s) | blocked / memcpy | stall of overlapped steps |\n");
    std::printf("|-------------|---------------------|--------------|-------------------|------------------|---------------------------|\n");
    for (const auto& row : rows_out) {
      char stall[64] = "-";
      if (row.overlapped > 0)
        std::snprintf(stall, sizeof stall, "%.2f s of %.2f s (%.1f%%)", row.slowdown, row.overlapped,
                      100 * row.slowdown / row.overlapped);
      std::printf("| save %-7s | %19.2f | %12.2f | %17.2f | %15.2fx | %25s |\n", row.mode.c_str(), row.blocked,
                  row.total, gb / row.total, row.blocked / memcpy_time, stall);
    }
    std::printf("| load        | %19.2f | %12.2f | %17.2f | %16s | %25s |\n", load_time, load_time, gb / load_time, "-", "-");
    std::printf("| HF export   | %19.2f | %12.2f | %17.2f | %16s | %25s |\n", export_time, export_time, gb / export_time, "-", "-");
    std::printf("| HF import   | %19.2f | %12.2f | %17.2f | %16s | %25s |\n", import_time, import_time, gb / import_time,
                "-", "-");
    std::printf("\nload breakdown (rank 0, %d threads, %.2f GB): read %.2f s (cold, %.2f GB/s), verify %.2f s (CRC-32 in "
                "memory, %.2f GB/s), apply %.2f s (one copy of the state); the load: %.2f s\n",
                threads, read_gb, read_time, read_gb / read_time, verify_time, gb / ranks / verify_time, memcpy_time,
                load_time);
  }
  titan::detail::remove_tree(dir + "/sync");
  titan::detail::remove_tree(dir + "/async");
  world->shutdown();
  return 0;
}
