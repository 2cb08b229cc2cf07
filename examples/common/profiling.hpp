#pragma once
// The trainer's [profiling]: PyTorch profiler (Kineto) traces of every profile_freq-th step, in
// Chrome trace format (chrome://tracing, Perfetto, TensorBoard's profiler plugin), one file per
// rank: <job.dump_folder>/<save_traces_folder>/iteration_<step>/rank<r>_trace.json. The step
// before a recorded one warms the profiler up (Kineto's prepare: CUPTI set up outside the
// recorded step). On a GPU the trace holds the CUDA kernels and memory copies with their stream
// times next to the CPU operators; scripts/gpu/profile_report.py summarises one.
#include "config.hpp"

#include <c10/core/Device.h>

#include <cstdint>
#include <filesystem>
#include <string>

namespace titan::examples {

/// Starts and stops the profiler around the trainer's steps (the trainer calls step_begins and
/// step_ends around each step).
class StepProfiler {
 public:
  StepProfiler(const ProfilingConfig& config, const std::filesystem::path& dump_folder, int rank,
               c10::Device device);
  /// Before `step`: warms the profiler up if the next step is recorded, starts it if this one is.
  void step_begins(int64_t step);
  /// After `step`: for a recorded step, waits for the device, stops the profiler and writes the
  /// trace; returns its path ("" for other steps).
  std::string step_ends(int64_t step);
  /// Whether `step` is recorded.
  bool recorded(int64_t step) const { return step % freq_ == 0; }

 private:
  int64_t freq_;
  std::filesystem::path folder_;
  int rank_;
  c10::Device device_;
  bool prepared_ = false, running_ = false;
};

}  // namespace titan::examples
