#pragma once
// titan/fused/cuda/runtime.cuh: what titan's kernels take from the CUDA runtime, in one place: a
// checked launch on the current stream, the device guard, the multiprocessor count (and an
// alignment check that only the emulator makes). Built with TITAN_CUDA_EMULATION (the test suite's
// CPU emulator, tests/fused/cuda_emulator.hpp, included first), the kernels compile as host code
// and the emulator provides these instead: that is how the kernels run in CI, where there is no GPU.
#include <cstddef>
#include <cstdint>
#include <utility>

#ifdef TITAN_CUDA_EMULATION
#ifndef TITAN_CUDA_EMULATOR_INCLUDED
#error "TITAN_CUDA_EMULATION needs tests/fused/cuda_emulator.hpp included before titan's .cuh files"
#endif
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace titan::cuda::detail {

/// Makes a tensor's device the current one for the kernels launched in its scope.
using DeviceGuard = c10::cuda::CUDAGuard;

/// The current GPU's multiprocessors (132 on an H100 or H200 SXM).
inline int64_t multiprocessors() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

/// Nothing on a GPU, where a misaligned access faults by itself; the emulator checks that `p` is
/// `alignment`-aligned.
__device__ __forceinline__ void check_aligned(const void* p, size_t alignment) {}

/// kernel<<<grid, block>>>(args...) on the current stream, then the launch's error checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace titan::cuda::detail
#endif
