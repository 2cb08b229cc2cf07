#pragma once
// Shared by the fused-operator suites: titan's CUDA kernels are registered wherever this build has
// them, so that the cases on CUDA (TITAN_TEST_DEVICE=cuda, the GPU kit) run them.
#include "../support/multirank.hpp"
#include "kernel_checks.hpp"

#include <titan/ac.hpp>
#include <titan/fused.hpp>

#include <memory>
#include <string>
#include <vector>
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

/// Checks each of `got` against `want`, the unfused operators' results: within one rounding where
/// titan's CUDA kernels run (fp32 inside, one rounding; fp64 takes the ATen path), else bitwise (the
/// ATen implementation runs the unfused operators). Given `exact` (the same in fp64), each result is
/// checked to be as close to it as the unfused one is, which replaces the check within one rounding
/// of the unfused result where the kernels run.
inline void check_matches_unfused(const std::vector<torch::Tensor>& got, const std::vector<torch::Tensor>& want,
                                  torch::Dtype dtype, const std::vector<torch::Tensor>& exact = {}) {
  REQUIRE(got.size() == want.size());
  REQUIRE((exact.empty() || exact.size() == got.size()));
  const bool kernels = fused_kernels_run() && dtype != torch::kDouble;
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK((got[i].scalar_type() == dtype));
    if (!exact.empty()) CHECK(as_close_as(got[i], want[i], exact[i], dtype));
    if (!kernels)
      CHECK(same_values(got[i], want[i]));
    else if (exact.empty())
      CHECK(within_rounding(got[i], want[i], dtype));
  }
}

/// Checks that per-operator activation checkpointing (keeping the outputs of `saved`, every call)
/// leaves the parameter gradients of the module `make()` returns (seeded the same each time)
/// bitwise unchanged after `loss(module)`.backward().
template <typename MakeModule, typename Loss>
void check_gradients_under_op_ac(const MakeModule& make, const Loss& loss, const std::vector<std::string>& saved) {
  auto gradients = [&](bool checkpointed) {
    auto module = make();
    module->to(device());
    if (checkpointed)
      titan::checkpoint_wrapper(*module, titan::CheckpointWrapperOptions().policy(
                                             std::make_shared<titan::OpSavePolicy>(saved, std::vector<std::string>{})));
    loss(module).backward();
    std::vector<torch::Tensor> grads;
    for (const auto& p : module->parameters()) grads.push_back(p.grad());
    return grads;
  };
  const auto plain = gradients(false), checkpointed = gradients(true);
  REQUIRE(plain.size() == checkpointed.size());
  for (size_t i = 0; i < plain.size(); ++i) CHECK(same_values(plain[i], checkpointed[i]));
}

}  // namespace titan_test
