#!/usr/bin/env bash
# Checkpoint I/O in one run on one disk: the disk's fsync'd write bandwidth (dd), titan's
# bench_checkpoint and PyTorch DCP (dcp_reference.py) on the same state, in --rounds rounds
# (default 3; titan first in odd rounds, DCP first in even ones, a dd before each), and one table of
# medians with the rounds' range and titan / DCP ratios: shared virtual disks vary by 2-4x within
# minutes, so single runs mislead. Build first (scripts/build.sh); BUILD_DIR selects the build,
# TITAN_DEVICE=cuda puts both states on the GPU.
#   bench/checkpoint/run.sh [--params N] [--dir DIR] [--nproc R] [--io-threads T] [--rounds K]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build="${BUILD_DIR:-$root/build}"
params=1000000000 dir=/tmp/titan_bench_checkpoint nproc=1 io_threads=0 rounds=3
while (($#)); do
  case "$1" in
    --params) params=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --io-threads) io_threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "usage: run.sh [--params N] [--dir DIR] [--nproc R] [--io-threads T] [--rounds K]" >&2; exit 2 ;;
  esac
done
export OMP_NUM_THREADS=1
mkdir -p "$dir"
results="$dir/results"
rm -rf "$results"
mkdir -p "$results"

# dd: as many bytes as the state (at most 4 GiB), written and fsynced.
count=$(( (params * 4 / 67108864) < 64 ? (params * 4 / 67108864) : 64 ))
count=$(( count < 1 ? 1 : count ))
run_dd() {
  local start=$EPOCHREALTIME
  dd if=/dev/zero of="$dir/dd.bin" bs=64M count="$count" conv=fsync status=none
  echo "$((count * 67108864)) $start $EPOCHREALTIME" > "$1"
  rm -f "$dir/dd.bin"
}
run_titan() {
  "$build/tests/titan_launch" --nproc "$nproc" -- "$build/bench/checkpoint/bench_checkpoint" --params "$params" \
    --dir "$dir/titan" --io-threads "$io_threads" | sed 's/^\[rank 0\] //' > "$1"
}
run_dcp() {
  local launcher=("$root/.venv/bin/python")
  ((nproc == 1)) || launcher=("$root/.venv/bin/torchrun" --standalone --nproc_per_node "$nproc")
  if ! "${launcher[@]}" "$root/bench/checkpoint/dcp_reference.py" --params "$params" --dir "$dir/dcp" > "$1.log" 2>&1; then
    echo "run.sh: the DCP reference failed:" >&2
    tail -20 "$1.log" >&2
    exit 1
  fi
  grep '^{' "$1.log" > "$1"
}
for ((round = 1; round <= rounds; ++round)); do
  run_dd "$results/dd.$round"
  if ((round % 2)); then
    run_titan "$results/titan.$round"; run_dcp "$results/dcp.$round"
  else
    run_dcp "$results/dcp.$round"; run_titan "$results/titan.$round"
  fi
  echo "run.sh: round $round of $rounds done" >&2
done

"$root/.venv/bin/python" - "$results" "$rounds" <<'PY'
import json, re, statistics, sys
folder, rounds = sys.argv[1], int(sys.argv[2])
titan, dcp, disk = [], [], []
for r in range(1, rounds + 1):
    nbytes, start, end = open(f"{folder}/dd.{r}").read().split()
    disk.append(int(nbytes) / 1e9 / (float(end) - float(start)))
    dcp.append(json.load(open(f"{folder}/dcp.{r}")))
    text = open(f"{folder}/titan.{r}").read()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (save sync|save async 2|save async|load|HF export|HF import)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
        m = re.match(r"\| save (async 2|async)\s*\|.*\|\s*([\d.-]+) s of ([\d.]+) s", line)
        if m:
            rows["stall " + m.group(1)] = (float(m.group(2)), float(m.group(3)))
    rows["memcpy"] = float(re.search(r"\(memcpy\): ([\d.]+) s", text).group(1))
    m = re.search(r"load breakdown .*: read ([\d.]+) s .* verify ([\d.]+) s .* apply ([\d.]+) s", text)
    if m:
        rows["breakdown"] = tuple(float(x) for x in m.groups())
    rows["gb"] = float(re.search(r"checkpoint of ([\d.]+) GB", text).group(1))
    titan.append(rows)
gb = titan[0]["gb"]
med = statistics.median
span = lambda xs: f"{med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
print(f"checkpoint of {gb:.2f} GB, {dcp[0]['ranks']} rank(s), {rounds} rounds (median, range); "
      f"disk (dd, fsync): {span(disk)} GB/s\n")
print("| operation | titan s | DCP s | titan GB/s | DCP GB/s | titan / DCP speed | titan / disk |")
print("|---|---|---|---|---|---|---|")
def row(name, titan_s, dcp_s, vs_disk=True):
    t, d = med(titan_s), med(dcp_s)
    ratios = [b / a for a, b in zip(titan_s, dcp_s)]  # per round: the two ran minutes apart
    print(f"| {name} | {span(titan_s)} | {span(dcp_s)} | {gb / t:.2f} | {gb / d:.2f} | {span(ratios)}x | "
          + (f"{gb / t / med(disk):.0%} |" if vs_disk else "- |"))
row("save (sync, durable)", [t["save sync"][1] for t in titan], [d["save_sync_s"] for d in dcp])
row("async save: training blocked", [t["save async"][0] for t in titan], [d["save_async_blocked_s"] for d in dcp], False)
row("async save, reused staging: blocked", [t["save async 2"][0] for t in titan], [d["save_async_blocked_s"] for d in dcp], False)
row("async save: until durable", [t["save async"][1] for t in titan], [d["save_async_s"] for d in dcp])
row("load (cold)", [t["load"][1] for t in titan], [d["load_s"] for d in dcp], False)
for name in ("HF export", "HF import"):
    seconds = [t[name][1] for t in titan]
    print(f"| titan {name} ({'safetensors::save_sharded + fsync' if 'export' in name else 'cold, safetensors::Reader'}) "
          f"| {span(seconds)} | - | {gb / med(seconds):.2f} | - | - | "
          + (f"{gb / med(seconds) / med(disk):.0%} |" if "export" in name else "- |"))
memcpy = [t["memcpy"] for t in titan]
blocked = [t["save async 2"][0] / t["memcpy"] for t in titan]
print(f"\ncopy of the state into preallocated host memory (memcpy): {span(memcpy)} s; titan's async save with reused "
      f"staging blocks for {span(blocked)}x that")
for mode in ("async", "async 2"):
    stalls = [100 * t["stall " + mode][0] / t["stall " + mode][1] for t in titan if "stall " + mode in t]
    if stalls:
        print(f"training steps overlapped with titan's background write ({mode}): stall {span(stalls)} % of their time")
parts = [t["breakdown"] for t in titan if "breakdown" in t]
if parts:
    print(f"titan's load, its parts timed apart (rank 0): read {span([p[0] for p in parts])} s (cold), "
          f"verify {span([p[1] for p in parts])} s (CRC-32 in memory), apply {span([p[2] for p in parts])} s "
          f"(one copy); the load reads and verifies together")
stalls = [100 * d["async_slowdown_s"] / d["async_overlapped_s"] for d in dcp if d.get("async_overlapped_s", 0) > 0]
if stalls:
    print(f"training steps overlapped with DCP's background write (async_save): stall {span(stalls)} % of their time")
PY
