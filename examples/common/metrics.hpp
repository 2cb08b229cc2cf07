#pragma once
// Training metrics of the example trainers: one readable line per logging interval, metrics.jsonl,
// and TensorBoard event files written without protobuf or TensorFlow.
//
// API summary
//   TensorBoardWriter tb(folder);  tb.add_scalar("loss", 2.5, step);  tb.flush();
//   uint32_t c = crc32c(data, n);  masked_crc32c(data, n);             // TFRecord checksums
//   int64_t b = peak_memory_bytes(device);  // CPU: VmHWM of /proc/self/status; CUDA: allocator peak
//   MetricsLogger log(MetricsOptions().log_freq(10).jsonl_path(p).tensorboard_dir(d)
//                         .flops_per_token(f).peak_flops(0 /* n/a */).enabled(rank == 0));
//   log.record(StepStats{step, loss, grad_norm, lr, tokens, step_s, data_s});  // every step;
//       // every log_freq steps (and step 1) it appends to jsonl and TensorBoard and returns
//       // the readable line for the caller to print
//   log.record_scalars(step, {{"val/loss", 2.1}});   // extra scalars (validation)
//   metrics_options(cfg, rank)   // from a TrainConfig: jsonl / TensorBoard under job.dump_folder
//
// Loss and grad norm are taken as given: reduce the loss over data-parallel ranks before
// recording. Tokens/s is per rank. MFU = tokens/s x flops_per_token / peak_flops, printed "n/a"
// when peak_flops is 0 (the default on CPU, which has no meaningful nominal peak here).

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

/// Peak memory of this process on `device` in bytes: the RSS high-water mark (VmHWM) on CPU, the
/// caching allocator's peak allocated bytes on CUDA (when compiled with CUDA; -1 otherwise).
int64_t peak_memory_bytes(const c10::Device& device);

/// What the training loop measured in one optimizer step.
struct StepStats {
  int64_t step = 0;          ///< 1-based optimizer step
  double loss = 0.0;         ///< mean loss of the step (reduced over data-parallel ranks)
  double grad_norm = 0.0;    ///< global gradient norm before clipping
  double lr = 0.0;           ///< learning rate used
  int64_t tokens = 0;        ///< tokens this rank processed in the step
  double step_seconds = 0.0;  ///< wall time of the whole step
  double data_seconds = 0.0;  ///< part of it spent waiting for batches
};

/// Where and how often metrics are written.
struct MetricsOptions {
  TORCH_ARG(int64_t, log_freq) = 10;         ///< steps per logging interval
  TORCH_ARG(std::string, jsonl_path) = "";    ///< metrics.jsonl ("" = none)
  TORCH_ARG(std::string, tensorboard_dir) = "";  ///< event folder ("" = none)
  TORCH_ARG(double, flops_per_token) = 0.0;  ///< model FLOPs per token (forward + backward)
  TORCH_ARG(double, peak_flops) = 0.0;       ///< device peak FLOP/s; 0 = MFU "n/a"
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);  ///< for peak memory
  TORCH_ARG(bool, enabled) = true;           ///< false on ranks that should not write (rank != 0)
};

/// The [metrics] section for global rank `rank` (only rank 0 writes): log_freq,
/// <dump_folder>/metrics.jsonl when enable_jsonl, <dump_folder>/<save_tb_folder> when
/// enable_tensorboard. FLOPs per token, peak FLOP/s and device are left for the caller.
MetricsOptions metrics_options(const TrainConfig& config, int rank);

/// Averages StepStats over each logging interval and writes them out.
class MetricsLogger {
 public:
  explicit MetricsLogger(MetricsOptions options);
  /// Adds one step; at a logging step (step 1 and every log_freq-th) writes the interval's line,
  /// JSON record and scalars and returns the line (also on disabled ranks, which write nothing).
  std::optional<std::string> record(const StepStats& stats);
  /// Writes extra scalars (e.g. validation loss) at `step` to jsonl and TensorBoard.
  void record_scalars(int64_t step, const std::map<std::string, double>& values);

 private:
  MetricsOptions options_;
  std::ofstream jsonl_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  // Sums over the current interval.
  int64_t steps_ = 0, tokens_ = 0;
  double loss_ = 0.0, grad_norm_ = 0.0, step_seconds_ = 0.0, data_seconds_ = 0.0;
};

}  // namespace titan::examples
