#!/usr/bin/env bash
# Checkpoint I/O in one run on one disk: the disk's fsync'd write bandwidth (dd), titan's
# bench_checkpoint and PyTorch DCP (dcp_reference.py) on the same state; prints one table with
# titan / DCP ratios. Build first (scripts/build.sh); BUILD_DIR selects the build, TITAN_DEVICE=cuda
# puts both states on the GPU.
#   bench/checkpoint/run.sh [--params N] [--dir DIR] [--nproc R]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build="${BUILD_DIR:-$root/build}"
params=1000000000 dir=/tmp/titan_bench_checkpoint nproc=1
while (($#)); do
  case "$1" in
    --params) params=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    *) echo "usage: run.sh [--params N] [--dir DIR] [--nproc R]" >&2; exit 2 ;;
  esac
done
export OMP_NUM_THREADS=1
mkdir -p "$dir"

# dd: as many bytes as the state (at most 4 GiB), written and fsynced.
count=$(( (params * 4 / 67108864) < 64 ? (params * 4 / 67108864) : 64 ))
count=$(( count < 1 ? 1 : count ))
dd_bytes=$(( count * 67108864 ))
dd_start=$EPOCHREALTIME
dd if=/dev/zero of="$dir/dd.bin" bs=64M count="$count" conv=fsync status=none
dd_end=$EPOCHREALTIME
rm -f "$dir/dd.bin"

titan=$("$build/tests/titan_launch" --nproc "$nproc" -- "$build/bench/checkpoint/bench_checkpoint" --params "$params" \
  --dir "$dir/titan" | sed 's/^\[rank 0\] //')
dcp_log="$dir/dcp.log"
if ((nproc > 1)); then
  dcp_run=("$root/.venv/bin/torchrun" --standalone --nproc_per_node "$nproc")
else
  dcp_run=("$root/.venv/bin/python")
fi
if ! "${dcp_run[@]}" "$root/bench/checkpoint/dcp_reference.py" --params "$params" --dir "$dir/dcp" > "$dcp_log" 2>&1; then
  echo "run.sh: the DCP reference failed:" >&2
  tail -20 "$dcp_log" >&2
  exit 1
fi
dcp=$(grep '^{' "$dcp_log")

table=$(cat <<'EOF'
import json, re, sys
dd_bytes, dd_seconds, dcp, titan_text = int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]), json.loads(sys.argv[4]), sys.argv[5]
gb = float(re.search(r"checkpoint of ([\d.]+) GB", titan_text).group(1))
rows = {}
for line in titan_text.splitlines():
    m = re.match(r"\| (save sync|save async 2|save async|load)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", line)
    if m:
        rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
disk = dd_bytes / 1e9 / dd_seconds
print(f"checkpoint of {gb:.2f} GB, {dcp['ranks']} rank(s); disk (dd, fsync): {disk:.2f} GB/s\n")
print("| operation | titan s | DCP s | titan GB/s | DCP GB/s | titan / DCP speed | titan / disk |")
print("|---|---|---|---|---|---|---|")
def row(name, titan_s, dcp_s, vs_disk=True):
    print(f"| {name} | {titan_s:.2f} | {dcp_s:.2f} | {gb / titan_s:.2f} | {gb / dcp_s:.2f} | {dcp_s / titan_s:.2f}x | "
          + (f"{gb / titan_s / disk:.0%} |" if vs_disk else "- |"))
row("save (sync, durable)", rows["save sync"][1], dcp["save_sync_s"])
row("async save: training blocked", rows["save async"][0], dcp["save_async_blocked_s"], False)
row("async save, reused staging: blocked", rows["save async 2"][0], dcp["save_async_blocked_s"], False)
row("async save: until durable", rows["save async"][1], dcp["save_async_s"])
row("load", rows["load"][1], dcp["load_s"], False)
EOF
)
"$root/.venv/bin/python" -c "$table" "$dd_bytes" "$dd_start" "$dd_end" "$dcp" "$titan"
