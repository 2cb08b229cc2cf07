# Sourced by scripts/gpu/setup.sh and run.sh on the GPU machine: where the kit, torch and the
# binaries are, and the library path that makes the CPU-built binaries load the GPU image's torch.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kit="${KIT_DIR:-$root/gpu_kit}"
python="${PYTHON:-python3}"
kit_build="$kit/build"
kit_site="$kit/site"
out="${OUT:-$root/gpu_out}"

die() { printf '[gpu] error: %s\n' "$*" >&2; exit 1; }
log() { printf '[gpu] %s\n' "$*" >&2; }

[[ -f "$kit/MANIFEST" ]] || die "no $kit/MANIFEST: run scripts/gpu/pack.sh on the CPU machine, then carry gpu_kit/"
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') ||
  die "$python cannot import torch (set PYTHON to the interpreter that has torch 2.11.0+cu130)"
export LD_LIBRARY_PATH="$torch_lib:$kit/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$out"
