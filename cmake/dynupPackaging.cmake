# Install rules, the CMake package (install tree and build tree), pkg-config file.
include(CMakePackageConfigHelpers)

set(DYNUP_CMAKE_DIR "${CMAKE_INSTALL_DATADIR}/cmake/dynup" CACHE STRING
    "Where dynupConfig.cmake is installed, relative to the prefix")

write_basic_package_version_file("${PROJECT_BINARY_DIR}/dynupConfigVersion.cmake"
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion # 0.x: a minor release may break the API
  ARCH_INDEPENDENT)

# Build tree: find_package(dynup) with dynup_DIR pointing at this build works too.
export(TARGETS dynup NAMESPACE dynup:: FILE "${PROJECT_BINARY_DIR}/dynupTargets.cmake")
configure_file("${PROJECT_SOURCE_DIR}/cmake/Findhttplib.cmake"
               "${PROJECT_BINARY_DIR}/Findhttplib.cmake" COPYONLY)
configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/dynupConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/dynupConfig.cmake"
  INSTALL_DESTINATION "${PROJECT_BINARY_DIR}"
  INSTALL_PREFIX "${PROJECT_BINARY_DIR}")

if(DYNUP_INSTALL)
  install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/dynup" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
  install(TARGETS dynup EXPORT dynupTargets)
  install(EXPORT dynupTargets NAMESPACE dynup:: DESTINATION "${DYNUP_CMAKE_DIR}")
  configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/dynupConfig.cmake.in"
    "${PROJECT_BINARY_DIR}/install/dynupConfig.cmake"
    INSTALL_DESTINATION "${DYNUP_CMAKE_DIR}")
  install(FILES
    "${PROJECT_BINARY_DIR}/install/dynupConfig.cmake"
    "${PROJECT_BINARY_DIR}/dynupConfigVersion.cmake"
    "${PROJECT_SOURCE_DIR}/cmake/Findhttplib.cmake"
    DESTINATION "${DYNUP_CMAKE_DIR}")

  configure_file("${PROJECT_SOURCE_DIR}/cmake/dynup.pc.in" "${PROJECT_BINARY_DIR}/dynup.pc" @ONLY)
  install(FILES "${PROJECT_BINARY_DIR}/dynup.pc" DESTINATION "${CMAKE_INSTALL_DATADIR}/pkgconfig")
  install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" DESTINATION "${CMAKE_INSTALL_DATADIR}/doc/dynup")
endif()
