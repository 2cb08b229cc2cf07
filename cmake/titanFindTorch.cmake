# titan_find_torch(): find LibTorch. When Torch_DIR / CMAKE_PREFIX_PATH do not already point at it,
# ask the Python interpreter TITAN_PYTHON (default: the project's .venv, else python3) for
# torch.utils.cmake_prefix_path, which is where the PyPI wheel keeps TorchConfig.cmake.
set(_TITAN_SOURCE_ROOT "${CMAKE_CURRENT_LIST_DIR}/..")

macro(titan_find_torch)
  find_package(Torch QUIET)
  if(NOT Torch_FOUND)
    if(NOT TITAN_PYTHON)
      if(EXISTS "${_TITAN_SOURCE_ROOT}/.venv/bin/python")
        set(TITAN_PYTHON "${_TITAN_SOURCE_ROOT}/.venv/bin/python")
      else()
        find_program(TITAN_PYTHON NAMES python3 python REQUIRED)
      endif()
    endif()
    execute_process(
      COMMAND "${TITAN_PYTHON}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
      OUTPUT_VARIABLE _titan_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _titan_torch_rc ERROR_QUIET)
    if(NOT _titan_torch_rc EQUAL 0)
      message(FATAL_ERROR "titan: LibTorch not found. Run ./scripts/bootstrap.sh, or set Torch_DIR, "
                          "or set TITAN_PYTHON to a Python with torch installed (tried '${TITAN_PYTHON}').")
    endif()
    list(APPEND CMAKE_PREFIX_PATH "${_titan_torch_prefix}")
    find_package(Torch REQUIRED)
  endif()
  # Under add_subdirectory the consumer links titan::titan, whose usage requirements name Torch's
  # imported targets: make them visible outside this directory.
  if(NOT PROJECT_IS_TOP_LEVEL)
    get_property(_titan_imported DIRECTORY PROPERTY IMPORTED_TARGETS)
    foreach(_titan_target IN LISTS _titan_imported)
      get_target_property(_titan_global ${_titan_target} IMPORTED_GLOBAL)
      if(NOT _titan_global)
        set_target_properties(${_titan_target} PROPERTIES IMPORTED_GLOBAL TRUE)
      endif()
    endforeach()
  endif()
endmacro()
