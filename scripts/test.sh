#!/usr/bin/env bash
# Installs and builds what is missing (scripts/build.sh), then runs the whole suite with ctest.
# Extra arguments go to ctest (for example: ./scripts/test.sh -R fsdp).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="${BUILD_DIR:-$root/build}"

"$root/scripts/build.sh"
cd "$build"
ctest --output-on-failure --timeout 900 "$@"
