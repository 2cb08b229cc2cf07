#pragma once
// Measuring helpers of the benchmarks: the heap in use, medians.
#include <malloc.h>

#include <algorithm>
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

}  // namespace titan_bench
