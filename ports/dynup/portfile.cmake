# Overlay port: builds the dynup checkout this file lives in.
#   vcpkg install dynup --overlay-ports=<dynup checkout>/ports
# For a registry, replace the SOURCE_PATH line with a pinned download, e.g.
#   vcpkg_from_github(OUT_SOURCE_PATH SOURCE_PATH REPO <owner>/dynup REF "v${VERSION}"
#                     SHA512 <sha512 of the archive> HEAD_REF main)
set(VCPKG_BUILD_TYPE release) # header-only

get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)

vcpkg_cmake_configure(
    SOURCE_PATH "${SOURCE_PATH}"
    OPTIONS
        -DDYNUP_BUILD_TESTS=OFF
        -DDYNUP_BUILD_EXAMPLES=OFF
        -DDYNUP_BUILD_BENCH=OFF
        -DDYNUP_BUILD_C_API=OFF # the port is the header-only library
        -DDYNUP_INSTALL=ON
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(CONFIG_PATH share/cmake/dynup)
vcpkg_fixup_pkgconfig()

# Nothing is architecture-dependent; the license goes in as the copyright file.
file(REMOVE_RECURSE
    "${CURRENT_PACKAGES_DIR}/debug"
    "${CURRENT_PACKAGES_DIR}/lib"
    "${CURRENT_PACKAGES_DIR}/share/doc"
)
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
