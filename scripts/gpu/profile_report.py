"""Summarises PyTorch profiler traces of titan's trainer ([profiling], docs/training.md): one table
per trace, for the GPU kit's profile stage (docs/gpu.md).

    python3 scripts/gpu/profile_report.py RUN/profile_trace/iteration_8/rank0_trace.json [...]

For a trace with GPU activity: the top kernels by total time (with their share of the GPU's busy
time), the GPU's idle share between its first and last activity of the step (gaps the host left:
launch overhead, synchronisation), the attention kernels (which SDPA backend ran), the runtime
cuDNN version (torch.backends.cudnn.version() of this Python), and the caching allocator's
retries (metrics.jsonl of the same run). A CPU-only trace gets the top CPU operators instead.
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
ATTENTION_WORDS = ("cudnn", "fmha", "flash", "attention", "sdpa", "attn")


def load_events(path):
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def busy_time(intervals):
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def top(events, count):
    by_name = defaultdict(lambda: [0, 0.0])
    for e in events:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"]
    return sorted(by_name.items(), key=lambda item: -item[1][1])[:count]


def short(name, width=100):
    return name if len(name) <= width else name[:width - 3] + "..."


def cudnn_version():
    try:
        import torch
        return str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "not available"
    except ImportError:
        return "unknown (no torch in this Python)"


def alloc_retries(trace_path):
    """The largest alloc_retries of the run's metrics.jsonl (<dump>/<traces>/iteration_N/rankR_trace.json)."""
    metrics = Path(trace_path).resolve().parents[2] / "metrics.jsonl"
    if not metrics.is_file():
        return "n/a (no metrics.jsonl next to the traces)"
    values = [json.loads(line).get("alloc_retries") for line in metrics.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    return f"{int(max(values))}" if values else "n/a (not recorded: CPU run)"


def report(path, count):
    events = load_events(path)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    lines = [f"profile {path}"]
    if not gpu:
        cpu = [e for e in events if e.get("cat") == "cpu_op"]
        lines += ["no GPU activity in this trace (a CPU run): top CPU operators",
                  "| operator | calls | total ms |", "|---|---|---|"]
        lines += [f"| {short(name)} | {calls} | {us / 1e3:.2f} |" for name, (calls, us) in top(cpu, count)]
        return "\n".join(lines)
    first = min(e["ts"] for e in gpu)
    last = max(e["ts"] + e["dur"] for e in gpu)
    busy = busy_time([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    kernels = [e for e in gpu if e.get("cat") == "kernel"]
    attention = [e for e in kernels if any(w in e["name"].lower() for w in ATTENTION_WORDS)]
    lines += [f"GPU window {(last - first) / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, idle share "
              f"{100 * (1 - busy / (last - first)):.1f}%; {len(kernels)} kernels; runtime cuDNN {cudnn_version()}; "
              f"allocator retries {alloc_retries(path)}",
              "| kernel | calls | total ms | share of busy |", "|---|---|---|---|"]
    lines += [f"| {short(name)} | {calls} | {us / 1e3:.2f} | {100 * us / busy:.1f}% |"
              for name, (calls, us) in top(gpu, count)]
    lines += ["attention kernels (the SDPA backend that ran):"]
    lines += [f"- {short(name, 160)}: {calls} calls, {us / 1e3:.2f} ms" for name, (calls, us) in top(attention, 6)]
    if not attention:
        lines.append("- none recognised (no kernel name has " + ", ".join(ATTENTION_WORDS) + ")")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", help="rank<r>_trace.json files written by the trainer")
    p.add_argument("--top", type=int, default=15, help="rows of the top table")
    a = p.parse_args()
    print("\n\n".join(report(path, a.top) for path in a.traces))


if __name__ == "__main__":
    main()
