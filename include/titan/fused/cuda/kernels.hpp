#pragma once
// titan/fused/cuda/kernels.hpp: switches titan's fused operators to their CUDA kernels on CUDA
// tensors. Defined in titan/fused/cuda/kernels.cu, which the titan::cuda_kernels target compiles
// with nvcc (CMake option TITAN_CUDA_KERNELS): link it to call this.

namespace titan::cuda {

/// Registers titan's CUDA kernels for titan's fused operators on CUDA tensors (each takes
/// precedence over the ATen implementation from then on, for the whole process); once per
/// process, later calls do nothing. See docs/fused.md for which kernels have run on a GPU.
void register_kernels();

}  // namespace titan::cuda
