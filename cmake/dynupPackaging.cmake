# Install rules, the CMake package (install tree and build tree), pkg-config file.
include(CMakePackageConfigHelpers)

set(DYNUP_CMAKE_DIR "${CMAKE_INSTALL_DATADIR}/cmake/dynup" CACHE STRING
    "Where dynupConfig.cmake is installed, relative to the prefix")

# The exported targets: dynup::dynup (header-only) and, when built, dynup::dynup_c (the
# C ABI library, which makes the package architecture-dependent).
set(_dynup_targets dynup)
set(_dynup_arch ARCH_INDEPENDENT)
if(TARGET dynup_c)
  list(APPEND _dynup_targets dynup_c)
  set(_dynup_arch)
endif()

write_basic_package_version_file("${PROJECT_BINARY_DIR}/dynupConfigVersion.cmake"
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion # 0.x: a minor release may break the API
  ${_dynup_arch})

# Build tree: find_package(dynup) with dynup_DIR pointing at this build works too.
export(TARGETS ${_dynup_targets} NAMESPACE dynup:: FILE "${PROJECT_BINARY_DIR}/dynupTargets.cmake")
configure_file("${PROJECT_SOURCE_DIR}/cmake/Findhttplib.cmake"
               "${PROJECT_BINARY_DIR}/Findhttplib.cmake" COPYONLY)
configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/dynupConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/dynupConfig.cmake"
  INSTALL_DESTINATION "${PROJECT_BINARY_DIR}"
  INSTALL_PREFIX "${PROJECT_BINARY_DIR}")

if(DYNUP_INSTALL)
  install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/dynup" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
  install(TARGETS ${_dynup_targets} EXPORT dynupTargets
    LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}")
  install(EXPORT dynupTargets NAMESPACE dynup:: DESTINATION "${DYNUP_CMAKE_DIR}")
  configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/dynupConfig.cmake.in"
    "${PROJECT_BINARY_DIR}/install/dynupConfig.cmake"
    INSTALL_DESTINATION "${DYNUP_CMAKE_DIR}")
  install(FILES
    "${PROJECT_BINARY_DIR}/install/dynupConfig.cmake"
    "${PROJECT_BINARY_DIR}/dynupConfigVersion.cmake"
    "${PROJECT_SOURCE_DIR}/cmake/Findhttplib.cmake"
    DESTINATION "${DYNUP_CMAKE_DIR}")

  # pkg-config, header-only so in share/. The prefix is found from the .pc file's own
  # directory, so the install can be moved (vcpkg installs into one tree, then copies).
  set(_dynup_pc_dir "${CMAKE_INSTALL_DATADIR}/pkgconfig")
  if(IS_ABSOLUTE "${_dynup_pc_dir}")
    set(DYNUP_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  else()
    file(RELATIVE_PATH _dynup_pc_up "/${_dynup_pc_dir}" "/")
    string(REGEX REPLACE "/$" "" _dynup_pc_up "${_dynup_pc_up}")
    set(DYNUP_PC_PREFIX "\${pcfiledir}/${_dynup_pc_up}")
  endif()
  if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
    set(DYNUP_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
  else()
    set(DYNUP_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
  endif()
  # Only Debian-style cpp-httplib (found through pkg-config) has a .pc file to require;
  # a CMake-package httplib (upstream, vcpkg) is header-only and needs no flags.
  set(DYNUP_PC_REQUIRES "nlohmann_json >= 3.9 libcurl")
  if(TARGET PkgConfig::PC_HTTPLIB)
    string(APPEND DYNUP_PC_REQUIRES " cpp-httplib")
  endif()
  configure_file("${PROJECT_SOURCE_DIR}/cmake/dynup.pc.in" "${PROJECT_BINARY_DIR}/dynup.pc" @ONLY)
  install(FILES "${PROJECT_BINARY_DIR}/dynup.pc" DESTINATION "${_dynup_pc_dir}")
  install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" DESTINATION "${CMAKE_INSTALL_DOCDIR}")
endif()
