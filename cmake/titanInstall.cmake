# Install and export rules for the header-only titan::titan target.
include(CMakePackageConfigHelpers)

set(TITAN_CMAKE_INSTALL_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/titan" CACHE STRING
    "Where titanConfig.cmake is installed")

install(TARGETS titan EXPORT titanTargets)
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/titan" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(EXPORT titanTargets NAMESPACE titan:: DESTINATION "${TITAN_CMAKE_INSTALL_DIR}")

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/titanConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/titanConfig.cmake"
  INSTALL_DESTINATION "${TITAN_CMAKE_INSTALL_DIR}")
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/titanConfigVersion.cmake"
  COMPATIBILITY SameMajorVersion
  ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/titanConfig.cmake" "${PROJECT_BINARY_DIR}/titanConfigVersion.cmake"
        DESTINATION "${TITAN_CMAKE_INSTALL_DIR}")
