// titan::cuda_kernels: titan's CUDA kernels and their registration for titan's fused operators.
// Compiled by nvcc (CMake option TITAN_CUDA_KERNELS); nothing is registered until
// titan::cuda::register_kernels() is called.
#include <titan/fused/cuda/adamw.cuh>
#include <titan/fused/cuda/add_rms_norm.cuh>
#include <titan/fused/cuda/cross_entropy.cuh>
#include <titan/fused/cuda/float8_cast.cuh>
#include <titan/fused/cuda/kernels.hpp>
#include <titan/fused/cuda/moe_combine.cuh>
#include <titan/fused/cuda/rope.cuh>
#include <titan/fused/cuda/swiglu.cuh>

#include <torch/library.h>

#include <memory>

namespace titan::cuda {

void register_kernels() {
  static const std::unique_ptr<torch::Library> library = [] {
    titan::register_cross_entropy_operators();  // the definitions first
    titan::register_rope_operators();
    titan::register_swiglu_operators();
    titan::register_add_rms_norm_operators();
    titan::register_adamw_operators();
    titan::register_moe_combine_operators();
    titan::register_float8_cast_operators();
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "titan", c10::DispatchKey::CUDA,
                                                "titan/fused/cuda/kernels.cu", __LINE__);
    lib->impl("cross_entropy_loss_and_grad", TORCH_FN(cross_entropy_loss_and_grad));
    lib->impl("cross_entropy_rescale_grad_", TORCH_FN(cross_entropy_rescale_grad_));
    lib->impl("rope_forward", TORCH_FN(rope_forward));
    lib->impl("rope_backward", TORCH_FN(rope_backward));
    lib->impl("swiglu_forward", TORCH_FN(swiglu_forward));
    lib->impl("swiglu_backward", TORCH_FN(swiglu_backward));
    lib->impl("add_rms_norm_forward", TORCH_FN(add_rms_norm_forward));
    lib->impl("add_rms_norm_backward", TORCH_FN(add_rms_norm_backward));
    lib->impl("adamw_copy_", TORCH_FN(adamw_copy_));
    lib->impl("moe_combine_forward", TORCH_FN(moe_combine_forward));
    lib->impl("moe_combine_backward", TORCH_FN(moe_combine_backward));
    lib->impl("float8_cast", TORCH_FN(float8_cast));
    lib->impl("float8_cast_transpose", TORCH_FN(float8_cast_transpose));
    return lib;
  }();
  (void)library;
}

}  // namespace titan::cuda
