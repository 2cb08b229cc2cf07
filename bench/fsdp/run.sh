#!/usr/bin/env bash
# Runs bench_fsdp (titan) and fsdp2_reference.py (PyTorch FSDP2) at 1, 2 and 4 CPU ranks and
# prints one table. Build first (scripts/build.sh); BUILD_DIR selects the build; extra arguments
# (e.g. --dim 256 --depth 4) go to both programs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build="${BUILD_DIR:-$root/build}"
export OMP_NUM_THREADS=1
echo "| impl         | ranks | step ms | peak RSS MiB | params+grads+AdamW MiB/rank |"
echo "|--------------|-------|---------|--------------|-----------------------------|"
"$build/tests/titan_launch" --nproc 1 -- "$build/bench/fsdp/bench_fsdp" --plain "$@" | sed 's/^\[rank 0\] //'
for n in 1 2 4; do
  "$build/tests/titan_launch" --nproc "$n" -- "$build/bench/fsdp/bench_fsdp" "$@" | sed 's/^\[rank 0\] //'
  "$root/.venv/bin/torchrun" --standalone --nproc_per_node "$n" "$root/bench/fsdp/fsdp2_reference.py" "$@" 2> >(grep -iv warn >&2)
done
