# Shared settings for titan's own tests, examples and benchmarks (not installed).
#
# titan_pch: one precompiled header with LibTorch and c10d, reused by every executable that links
# titan_dev, because a translation unit that parses <torch/torch.h> costs tens of seconds.

find_package(doctest QUIET)
if(NOT doctest_FOUND)
  find_path(TITAN_DOCTEST_INCLUDE_DIR doctest/doctest.h REQUIRED)
  add_library(doctest::doctest INTERFACE IMPORTED)
  target_include_directories(doctest::doctest INTERFACE "${TITAN_DOCTEST_INCLUDE_DIR}")
endif()

set(CMAKE_CXX_EXTENSIONS OFF)

add_library(titan_dev STATIC "${PROJECT_SOURCE_DIR}/cmake/titan_pch.cpp")
target_link_libraries(titan_dev PUBLIC titan::titan)
# The CUDA kernels where they are built (their definition TITAN_CUDA_KERNELS is part of the PCH).
if(TARGET titan_cuda_kernels)
  target_link_libraries(titan_dev PUBLIC titan_cuda_kernels)
endif()
target_compile_options(titan_dev PUBLIC -Wall -Wextra -Wno-unused-parameter)
target_precompile_headers(titan_dev PRIVATE
  <torch/torch.h>
  <torch/csrc/distributed/c10d/TCPStore.hpp>
  <titan/titan.hpp>)

# titan_add_executable(NAME SOURCES...): an executable built against titan with the shared PCH.
function(titan_add_executable name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE titan_dev)
  target_precompile_headers(${name} REUSE_FROM titan_dev)
endfunction()

# Python of the project's venv, for parity tests and data scripts.
if(NOT TITAN_PYTHON)
  set(TITAN_PYTHON "${PROJECT_SOURCE_DIR}/.venv/bin/python")
endif()
