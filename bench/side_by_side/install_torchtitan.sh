#!/usr/bin/env bash
# Installs torchtitan and what it imports (bench/side_by_side/requirements.txt, pinned, no
# dependency resolution) into FOLDER for the side-by-side benchmark's torchtitan rows, using the
# project's .venv pip (PyPI). The torch it runs on is the one already installed.
#   bench/side_by_side/install_torchtitan.sh build/torchtitan-site
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
target=${1:?usage: install_torchtitan.sh FOLDER}
stamp="$target/.titan-requirements"
requirements="$root/bench/side_by_side/requirements.txt"
if [[ -f "$stamp" ]] && cmp -s "$stamp" "$requirements"; then exit 0; fi
rm -rf "$target"
"$root/.venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$target" \
  -r <(sed 's/#.*//' "$requirements")
cp "$requirements" "$stamp"
