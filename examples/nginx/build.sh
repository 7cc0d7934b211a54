#!/usr/bin/env bash
# Builds ngx_http_upstream_dynup_module.so against the nginx on this machine, the way
# nginx documents for dynamic modules: a copy of nginx's configure tree (Debian:
# nginx-dev, /usr/share/nginx/src; never modified in place), then
#   ./configure --with-compat --add-dynamic-module=examples/nginx && make modules
#
# Usage: examples/nginx/build.sh OUT_DIR [DYNUP_INCLUDE_DIR] [DYNUP_LIB_DIR]
#   OUT_DIR            gets nginx-src/ (the copy) and ngx_http_upstream_dynup_module.so
#   DYNUP_INCLUDE_DIR  holds dynup/c/dynup.h (default: this checkout's include/)
#   DYNUP_LIB_DIR      holds libdynup_c.so (default: /usr/local/lib); it becomes the
#                      module's rpath, so nginx finds the library without ldconfig
# Environment: NGINX_SRC (default /usr/share/nginx/src), NGINX_CC_OPT (extra compiler
# flags, e.g. -fsanitize=address), NGINX_LD_OPT.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR [DYNUP_INCLUDE_DIR] [DYNUP_LIB_DIR]}
include_dir=${2:-$here/../../include}
lib_dir=${3:-/usr/local/lib}
src=${NGINX_SRC:-/usr/share/nginx/src}

[[ -x $src/configure ]] || {
  echo "build.sh: no nginx configure tree at $src (Debian: apt-get install nginx-dev)" >&2
  exit 1
}
[[ -f $include_dir/dynup/c/dynup.h ]] || { echo "build.sh: no dynup/c/dynup.h under $include_dir" >&2; exit 1; }
compgen -G "$lib_dir/libdynup_c.so*" >/dev/null || { echo "build.sh: no libdynup_c.so in $lib_dir" >&2; exit 1; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
include_dir=$(cd "$include_dir" && pwd)
lib_dir=$(cd "$lib_dir" && pwd)

# configure is slow (~20 s); it is rerun only when nginx's tree or the module's config
# changed. make then rebuilds the module alone.
stamp=$out/nginx-src/.dynup-configured
want="$src $(stat -c %Y "$src/configure") $(md5sum < "$here/config") $include_dir $lib_dir ${NGINX_CC_OPT:-} ${NGINX_LD_OPT:-}"
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  rm -rf "$out/nginx-src"
  cp -a "$src" "$out/nginx-src"
  (
    cd "$out/nginx-src"
    DYNUP_INCLUDE_DIR=$include_dir DYNUP_LIB_DIR=$lib_dir ./configure --with-compat \
      --with-cc-opt="-g -O2 -fPIC ${NGINX_CC_OPT:-}" --with-ld-opt="${NGINX_LD_OPT:-}" \
      --add-dynamic-module="$here" >configure.log 2>&1 ||
      { tail -n 30 configure.log >&2; exit 1; }
  )
  echo "$want" >"$stamp"
fi
# nginx compiles modules with -W -Wall -Werror: a warning fails the build. Not a
# sub-make of a caller's make (CMake): its jobserver flags do not apply here.
env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -C "$out/nginx-src" -f objs/Makefile modules >"$out/make.log" 2>&1 ||
  { tail -n 40 "$out/make.log" >&2; exit 1; }
cp "$out/nginx-src/objs/ngx_http_upstream_dynup_module.so" "$out/"
echo "$out/ngx_http_upstream_dynup_module.so"
