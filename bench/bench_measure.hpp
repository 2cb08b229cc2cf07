#pragma once
// Measuring helpers of the benchmarks: the heap in use, medians, timed runs on a device.
#include <malloc.h>
#include <torch/cuda.h>

#include <c10/core/Device.h>

#include <algorithm>
#include <chrono>
#include <utility>
#include <vector>

namespace titan_bench {

/// Bytes malloc has handed out and not taken back (heap and mmapped chunks): LibTorch's CPU
/// tensors live there, so its growth over a region is what the region's tensors hold.
inline double heap_bytes() {
  const auto info = mallinfo2();
  return static_cast<double>(info.uordblks + info.hblkhd);
}

/// The median of `values` (0 for none).
inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values.empty() ? 0.0 : values[values.size() / 2];
}

/// Milliseconds on a steady clock, read once `device`'s queued work is done (CUDA: synchronize).
inline double synced_now_ms(const c10::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// The median milliseconds of `steps` timed runs of `work` on `device`, after one warm-up run;
/// `prepare` runs before each run, untimed (e.g. dropping the gradients of the run before).
template <typename Work, typename Prepare>
double median_ms(const c10::Device& device, int steps, Work&& work, Prepare&& prepare) {
  std::vector<double> times;
  for (int step = 0; step <= steps; ++step) {  // step 0 warms up
    prepare();
    const double start = synced_now_ms(device);
    work();
    if (step > 0) times.push_back(synced_now_ms(device) - start);
  }
  return median(times);
}

/// median_ms with nothing to prepare.
template <typename Work>
double median_ms(const c10::Device& device, int steps, Work&& work) {
  return median_ms(device, steps, std::forward<Work>(work), [] {});
}

}  // namespace titan_bench
