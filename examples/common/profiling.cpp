#include "profiling.hpp"

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>

#include <set>

namespace titan::examples {

namespace {

namespace kineto = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

/// CPU operators with their input shapes, and on CUDA the device's kernels and copies.
std::set<ActivityType> activities(const c10::Device& device) {
  std::set<ActivityType> kinds{ActivityType::CPU};
  if (device.is_cuda()) kinds.insert(ActivityType::CUDA);
  return kinds;
}

ProfilerConfig profiler_config() { return ProfilerConfig(ProfilerState::KINETO, /*report_input_shapes=*/true); }

}  // namespace

StepProfiler::StepProfiler(const ProfilingConfig& config, const std::filesystem::path& dump_folder, int rank,
                           c10::Device device)
    : freq_(config.profile_freq), folder_(dump_folder / config.save_traces_folder), rank_(rank), device_(device) {
  TORCH_CHECK(freq_ >= 1, "profiling.profile_freq must be >= 1, got ", freq_);
}

void StepProfiler::step_begins(int64_t step) {
  if (!prepared_ && (recorded(step) || recorded(step + 1))) {
    kineto::prepareProfiler(profiler_config(), activities(device_));
    prepared_ = true;
  }
  if (!recorded(step)) return;
  kineto::enableProfiler(profiler_config(), activities(device_));
  running_ = true;
}

std::string StepProfiler::step_ends(int64_t step) {
  if (!running_) return "";
  if (device_.is_cuda()) torch::cuda::synchronize(device_.index());  // the step's kernels are in the trace
  auto result = kineto::disableProfiler();
  running_ = prepared_ = false;
  const auto dir = folder_ / ("iteration_" + std::to_string(step));
  std::filesystem::create_directories(dir);
  const auto path = (dir / ("rank" + std::to_string(rank_) + "_trace.json")).string();
  result->save(path);
  return path;
}

}  // namespace titan::examples
