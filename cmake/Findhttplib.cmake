# Finds cpp-httplib and provides httplib::httplib.
#
# Upstream cpp-httplib (and vcpkg, Conan) ship httplibConfig.cmake; Debian's
# libcpp-httplib-dev ships only a pkg-config file and a compiled library whose ABI
# depends on the CPPHTTPLIB_*_SUPPORT macros in that file, so those must be used.
include(FindPackageHandleStandardArgs)

if(NOT TARGET httplib::httplib)
  find_package(httplib CONFIG QUIET)
endif()

if(TARGET httplib::httplib)
  set(httplib_FOUND TRUE)
  if(NOT httplib_FIND_QUIETLY)
    message(STATUS "Found httplib: httplib::httplib (CMake package)")
  endif()
  return()
endif()

find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(PC_HTTPLIB QUIET IMPORTED_TARGET GLOBAL cpp-httplib)
endif()

if(PC_HTTPLIB_FOUND)
  add_library(httplib::httplib INTERFACE IMPORTED GLOBAL)
  target_link_libraries(httplib::httplib INTERFACE PkgConfig::PC_HTTPLIB)
  set(httplib_VERSION ${PC_HTTPLIB_VERSION})
  find_package_handle_standard_args(httplib REQUIRED_VARS PC_HTTPLIB_LINK_LIBRARIES VERSION_VAR httplib_VERSION)
else()
  # A plain single-header copy on the include path: header-only use.
  find_path(HTTPLIB_INCLUDE_DIR httplib.h)
  find_package_handle_standard_args(httplib REQUIRED_VARS HTTPLIB_INCLUDE_DIR)
  if(httplib_FOUND)
    add_library(httplib::httplib INTERFACE IMPORTED GLOBAL)
    target_include_directories(httplib::httplib INTERFACE "${HTTPLIB_INCLUDE_DIR}")
  endif()
endif()
