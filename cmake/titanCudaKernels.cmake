# titan::cuda_kernels: include/titan/fused/cuda/kernels.cu compiled by nvcc, when a CUDA compiler
# is found and LibTorch is a CUDA build. Linking it defines TITAN_CUDA_KERNELS=1 for the
# consumer, which may then call titan::cuda::register_kernels() (titan/fused/cuda/kernels.hpp).
# TITAN_CUDA_ARCHITECTURES (default 90: H100, H200) replaces the -gencode list LibTorch's CMake
# config puts in CMAKE_CUDA_FLAGS (eleven architectures: minutes of nvcc each).
include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER OR NOT TORCH_CUDA_LIBRARIES)
  message(STATUS "titan: no CUDA compiler or a CPU-only LibTorch: titan::cuda_kernels is not built "
                 "(the fused operators run their ATen implementation)")
  return()
endif()
set(TITAN_CUDA_ARCHITECTURES 90 CACHE STRING "CUDA architectures of titan::cuda_kernels")
enable_language(CUDA)
string(REGEX REPLACE "-gencode[ ;]+arch=[^ ;]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
set(CMAKE_CUDA_STANDARD 17)
# Built only for the targets that link it (a project adding titan as a subdirectory pays for nvcc
# only if it uses the kernels).
add_library(titan_cuda_kernels OBJECT EXCLUDE_FROM_ALL "${PROJECT_SOURCE_DIR}/include/titan/fused/cuda/kernels.cu")
add_library(titan::cuda_kernels ALIAS titan_cuda_kernels)
target_link_libraries(titan_cuda_kernels PUBLIC titan::titan)
set_target_properties(titan_cuda_kernels PROPERTIES CUDA_ARCHITECTURES "${TITAN_CUDA_ARCHITECTURES}")
target_compile_definitions(titan_cuda_kernels INTERFACE TITAN_CUDA_KERNELS=1)
message(STATUS "titan: titan::cuda_kernels for CUDA architectures ${TITAN_CUDA_ARCHITECTURES}")
