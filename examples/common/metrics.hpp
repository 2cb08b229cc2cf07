#pragma once
// Training metrics of the example trainers: one readable line per logging interval, metrics.jsonl,
// and TensorBoard event files written without protobuf or TensorFlow.
//
// API summary
//   TensorBoardWriter tb(folder);  tb.add_scalar("loss", 2.5, step);  tb.flush();
//   uint32_t c = crc32c(data, n);  masked_crc32c(data, n);             // TFRecord checksums
//   PeakMemory m = peak_memory(device);  reset_peak_memory(device);    // per logging interval
//   double peak = peak_flops_of("NVIDIA H100 80GB HBM3");              // 989e12 (dense bf16)
//   MetricsLogger log(MetricsOptions().log_freq(10).jsonl_path(p).tensorboard_dir(d)
//                         .flops_per_token(f).peak_flops(0 /* n/a */).ranks_per_replica(tp)
//                         .enabled(rank == 0));
//   if (log.is_log_step(step))   // step 1 and every log_freq-th
//     print(log.record(IntervalStats{...}));  // appends to jsonl and TensorBoard, returns the line
//   log.record_scalars(step, {{"val/loss", 2.1}});   // extra scalars (validation)
//   metrics_options(cfg, rank)   // from a TrainConfig: jsonl / TensorBoard under job.dump_folder
//
// The caller measures an interval (the steps since the last line) after the device finished its
// work, so its time is real and not just the time to enqueue kernels. Loss and grad norm are taken
// as given: reduce the loss over data-parallel ranks first. Tokens/s is per device: a model
// replica's tokens are shared by its ranks_per_replica ranks (tensor parallel), as in torchtitan.
// MFU = tokens/s x flops_per_token / peak_flops, "n/a" when peak_flops is 0 (CPU, unknown GPUs).

#include "config.hpp"

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <fstream>
#include <map>
#include <optional>
#include <string>

namespace titan::examples {

/// CRC-32C (Castagnoli) of `size` bytes.
uint32_t crc32c(const void* data, size_t size);
/// The TFRecord checksum: CRC-32C rotated right by 15 bits plus 0xa282ead8.
uint32_t masked_crc32c(const void* data, size_t size);

/// Writes scalars as TensorBoard events: folder/events.out.tfevents.<seconds>.<host>.<pid>, a
/// TFRecord file whose first event is the file_version "brain.Event:2".
class TensorBoardWriter {
 public:
  /// Creates `folder` and the event file.
  explicit TensorBoardWriter(const std::string& folder);
  /// Appends one scalar event (wall_time = now unless given, seconds since the epoch).
  void add_scalar(const std::string& tag, double value, int64_t step, std::optional<double> wall_time = std::nullopt);
  void flush();
  const std::string& path() const { return path_; }  ///< the event file

 private:
  void write_record(const std::string& event);
  std::string path_;
  std::ofstream file_;
};

/// Peak memory of this process on a device since the last reset_peak_memory, in bytes (-1: not
/// measured). CUDA: the caching allocator's peak active and reserved bytes (when compiled with
/// CUDA) and its allocation retries so far (a cudaMalloc that failed, freed the cache and tried
/// again: a sign of fragmentation or memory pressure). CPU: the RSS high-water mark (VmHWM) as
/// active; reserved and retries are -1.
struct PeakMemory {
  int64_t active = -1;
  int64_t reserved = -1;
  int64_t alloc_retries = -1;
};
PeakMemory peak_memory(const c10::Device& device);
/// Starts a new peak-memory interval on `device`: resets the CUDA allocator's peaks, or on CPU the
/// RSS high-water mark (writes "5" to /proc/self/clear_refs; where that is refused the CPU figure
/// stays the process's peak).
void reset_peak_memory(const c10::Device& device);

/// Dense bf16 peak FLOP/s of a GPU by its CUDA device name (torchtitan's table: A100 312e12,
/// H100 SXM 989e12, H100 PCIe 756e12, H100 NVL 835e12, H200 989e12, B200 2250e12, L40S 362e12);
/// 0 for a name it does not know.
double peak_flops_of(const std::string& device_name);

/// What the training loop measured over one logging interval (the steps since the last line).
struct IntervalStats {
  int64_t step = 0;           ///< last optimizer step of the interval
  int64_t steps = 0;          ///< optimizer steps in it (skipped ones included)
  double loss = 0.0;          ///< mean loss of those steps (reduced over data-parallel ranks)
  double grad_norm = 0.0;     ///< mean global gradient norm before clipping, over the finite ones
  double lr = 0.0;            ///< learning rate of the last step
  int64_t tokens = 0;         ///< tokens this rank processed in the interval
  double seconds = 0.0;       ///< wall time of the interval, until the device finished its work
  double data_seconds = 0.0;  ///< part of it spent waiting for batches
  int64_t skipped = 0;        ///< steps whose update was skipped (non-finite gradient norm)
};

/// Where and how often metrics are written.
struct MetricsOptions {
  TORCH_ARG(int64_t, log_freq) = 10;         ///< steps per logging interval
  TORCH_ARG(std::string, jsonl_path) = "";    ///< metrics.jsonl ("" = none)
  TORCH_ARG(std::string, tensorboard_dir) = "";  ///< event folder ("" = none)
  TORCH_ARG(double, flops_per_token) = 0.0;  ///< model FLOPs per token (forward + backward)
  TORCH_ARG(double, peak_flops) = 0.0;       ///< device peak FLOP/s; 0 = MFU "n/a"
  TORCH_ARG(int64_t, ranks_per_replica) = 1;  ///< ranks sharing one replica's tokens (TP degree)
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);  ///< for peak memory
  TORCH_ARG(bool, enabled) = true;           ///< false on ranks that should not write (rank != 0)
};

/// The [metrics] section for global rank `rank` (only rank 0 writes): log_freq,
/// <dump_folder>/metrics.jsonl when enable_jsonl, <dump_folder>/<save_tb_folder> when
/// enable_tensorboard, peak_flops when set (> 0). FLOPs per token, the peak FLOP/s of the device
/// otherwise, ranks per replica and device are left for the caller.
MetricsOptions metrics_options(const TrainConfig& config, int rank);

/// Writes each logging interval out: a readable line, metrics.jsonl and TensorBoard scalars.
class MetricsLogger {
 public:
  explicit MetricsLogger(MetricsOptions options);
  /// Whether `step` ends a logging interval: step 1 and every log_freq-th.
  bool is_log_step(int64_t step) const { return step == 1 || step % options_.log_freq() == 0; }
  /// Writes the interval's JSON record and scalars (on enabled ranks), resets the device's peak
  /// memory for the next interval, and returns the readable line (on every rank).
  std::string record(const IntervalStats& stats);
  /// Writes extra scalars (e.g. validation loss) at `step` to jsonl and TensorBoard.
  void record_scalars(int64_t step, const std::map<std::string, double>& values);

 private:
  MetricsOptions options_;
  std::ofstream jsonl_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
};

}  // namespace titan::examples
