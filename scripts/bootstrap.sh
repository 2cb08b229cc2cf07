#!/usr/bin/env bash
# Installs what titan needs on a fresh Debian bookworm machine, idempotently:
#   1. Debian -dev packages (skipped when all are installed already),
#   2. a project-local .venv/ with the pinned torch wheel (our LibTorch) and the
#      pinned Python test references (skipped when scripts/requirements.txt is unchanged),
#   3. the offline corpus (skipped when present).
# Prints the CMake prefix path of LibTorch on its last line when called with --print-prefix.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
requirements="$root/scripts/requirements.txt"

debian_packages=(
  build-essential cmake ninja-build ccache git
  libtomlplusplus-dev libfmt-dev doctest-dev nlohmann-json3-dev libpcre2-dev libutf8proc-dev
  libsentencepiece-dev libgloo-dev
  python3-venv
  python3.11-doc dict-gcide
  slurm-wlm munge  # the one-machine Slurm cluster of tests/slurm (scripts/slurm/cluster.sh)
)

log() { printf '[bootstrap] %s\n' "$*" >&2; }

install_debian_packages() {
  local missing=()
  for p in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then return; fi
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  if [[ $(id -u) != 0 ]]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_venv() {
  local stamp="$venv/.titan-requirements"
  if [[ -x "$venv/bin/python" ]] && [[ -f "$stamp" ]] && cmp -s "$stamp" "$requirements"; then return; fi
  if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    python3 -m venv "$venv"
  fi
  log "installing pinned Python packages from scripts/requirements.txt (torch is large: a few minutes)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
}

install_debian_packages
install_venv
if [[ -x "$root/scripts/make_corpus.sh" ]]; then "$root/scripts/make_corpus.sh"; fi

if [[ "${1:-}" == "--print-prefix" ]]; then
  "$venv/bin/python" -c "import torch.utils; print(torch.utils.cmake_prefix_path)" 2>/dev/null
fi
