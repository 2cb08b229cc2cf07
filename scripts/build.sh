#!/usr/bin/env bash
# Bootstraps (scripts/bootstrap.sh), then configures and builds titan's tests and examples in
# ./build (kept between runs; BUILD_DIR overrides). Extra arguments go to `cmake --build`.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="${BUILD_DIR:-$root/build}"

"$root/scripts/bootstrap.sh"

if [[ ! -f "$build/build.ninja" ]]; then
  launcher=()
  if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
  cmake -S "$root" -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}" \
    -DTITAN_PYTHON="$root/.venv/bin/python" \
    "${launcher[@]}"
fi
# Two cores and ~1.5 GB per LibTorch translation unit: two jobs at most.
cmake --build "$build" -j "${BUILD_JOBS:-2}" "$@"
