#pragma once
// Shared by the fused-operator suites: titan's CUDA kernels are registered wherever this build has
// them, so that the cases on CUDA (TITAN_TEST_DEVICE=cuda, the GPU kit) run them.
#include "../support/multirank.hpp"

#include <titan/fused.hpp>
#ifdef TITAN_CUDA_KERNELS
#include <titan/fused/cuda/kernels.hpp>
#endif

namespace titan_test {

/// Registers titan's CUDA kernels once where this build has them; whether it did.
inline bool fused_kernels_registered() {
  static const bool registered = [] {
#ifdef TITAN_CUDA_KERNELS
    titan::cuda::register_kernels();
    return true;
#else
    return false;
#endif
  }();
  return registered;
}

/// Whether the fused operators run titan's CUDA kernels in this suite (else their ATen implementation).
inline bool fused_kernels_run() { return fused_kernels_registered() && device().is_cuda(); }

}  // namespace titan_test
