"""The GPU cost model's table: titan and its Python peers, each step traced on the meta device at the
GPU benchmark's shape, every kernel priced on a GPU description (cost_model.py), one table.

    .venv/bin/python bench/gpu_cost/run.py                      # Llama 3 1B, seq 8192, bf16, AC op
    .venv/bin/python bench/gpu_cost/run.py --calibrate          # refit the efficiencies on the H200 rows
    .venv/bin/python bench/gpu_cost/run.py --preset gpu_8b      # Llama 3 8B's shape, 8 layers (the kit's bench_8b)
    .venv/bin/python bench/gpu_cost/run.py --preset gpu_moe     # Qwen3-30B-A3B's blocks, 4 layers (MoE)
    .venv/bin/python bench/gpu_cost/run.py --preset small --check   # the ctest (gpu_cost.small)

Rows: titan (bench_gpu_cost_trace: the trainer's model, parallelize_llama, FusedAdamW, step; titan's
fused operators as their ATen implementation, the default build), titan_kernels (the same step
with each fused operator one CUDA kernel: a build with TITAN_CUDA_KERNELS), titan_fused (titan_kernels
with model.fused_projections: wq|wk|wv and w1|w3 one GEMM each), titan_float8 (dense presets:
titan_fused with float8.enable, tensorwise, the output layer in bf16: the float8 matmuls at the fp8
rate, each cast one titan::float8_cast_transpose kernel writing the layouts its matmuls take, q|k|v
and gate|up each from one cast of their input), and the peers of bench/side_by_side (trace_peers.py): PyTorch FSDP2 eager, torchtitan 0.2.2 eager, and
both with torch.compile (the eager traces with Inductor's fusion of memory-bound kernels applied).
A mixture-of-experts preset (gpu_moe, small_moe) has one peer instead: torchtitan 0.2.2's Qwen3-MoE
(torchtitan_moe: grouped GEMMs, expert bias), eager and compiled; titan's rows are its qwen3_moe
blocks with the same routing and expert bias.
Measured figures (MEASURED, per preset and GPU, from docs/performance.md) stand beside the
predictions with the ratio error; --calibrate fits the efficiencies on a preset's measured eager
rows. torchtitan and its imports are installed into build/torchtitan-site on first use
(bench/side_by_side/install_torchtitan.sh, PyPI).

--check (the ctest), at the small dense preset and at small_moe: traces without AC, and checks for
titan and each peer that the matmul FLOPs are exactly 6 x (parameters each token goes through,
without the token embedding: k of the E experts) x tokens (forward 2, backward 4 per multiply-add;
plus torchtitan's MoE combine, a bmm), one attention kernel per layer forward and one backward,
AdamW stepping every parameter once, its traffic 28 bytes per fp32 parameter (32 where it clips
inside the step, writing the gradients back; titan_fused's titan::adamw_copy_ reads bf16 gradients
and writes the bf16 copy: 30); then with per-operator AC that titan recomputes the same matmul FLOPs as the peers
(torchtitan's policy: every other matmul kept; its MoE also recomputes the router's gate), and
with fused projections some, at most as many. titan_fused and titan_float8 take the same FLOP,
attention and AdamW checks.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "bench/side_by_side"))
import cost_model as cm  # noqa: E402
import reference  # noqa: E402  (bench/side_by_side/reference.py: hidden_dim)

PRESETS = {
    "gpu": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
                vocab_size=128256, seq_len=8192, local_batch=1, dtype="bfloat16", ac="op"),
    # Llama 3 8B's layer shape with 8 of its 32 layers: the GPU kit's second shape (bench_8b), which
    # fills the GPU's matmul units for the MFU figure.
    "gpu_8b": dict(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
                   vocab_size=128256, seq_len=8192, local_batch=1, dtype="bfloat16", ac="op"),
    "small": dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=1.5,
                  vocab_size=4000, seq_len=128, local_batch=2, dtype="bfloat16", ac="op"),
    # Mixture of experts: Qwen3-30B-A3B's blocks (q/k norms, head_dim 128, 128 experts of width 768,
    # top-8) with 4 of its 48 layers, against torchtitan's Qwen3-MoE at that shape.
    "gpu_moe": dict(dim=2048, n_layers=4, n_heads=32, n_kv_heads=4, head_dim=128, qk_norm=1, moe_experts=128,
                    moe_top_k=8, moe_hidden=768, vocab_size=151936, rope_theta=1e6, seq_len=8192, local_batch=1,
                    dtype="bfloat16", ac="op"),
    "small_moe": dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, qk_norm=1, moe_experts=8,
                      moe_top_k=2, moe_hidden=64, vocab_size=4000, rope_theta=1e6, seq_len=128, local_batch=2,
                      dtype="bfloat16", ac="op"),
}

# Step times measured by the GPU kit, per preset and GPU (ms per step of 8192 tokens; the rows are
# bench/side_by_side's impls, named as the traces are). Preset "gpu": an H200, same run
# (docs/performance.md, "Kit run of 2026-11-26, 07:45 UTC", commit 287104f). gpu_moe and gpu_8b
# (the kit's bench_moe and bench_8b stages) have not been measured yet.
MEASURED = {
    "gpu": {
        "H200": dict(when="2026-11-26, commit 287104f", matmul_tflops=777,
                     ms=dict(titan=8192e3 / 34469, fsdp2=8192e3 / 34950, fsdp2_compile=8192e3 / 42245,
                             torchtitan=8192e3 / 39283, torchtitan_compile=8192e3 / 46182)),
    },
}
# titan's CUDA kernels; and its fused projections; those and float8 linear layers (dense presets:
# the side-by-side benchmark's titan_float8 row, tensorwise). Each: bench_gpu_cost_trace's flags.
TITAN_VARIANTS = {"titan_kernels": ["--titan-kernels", "cuda"],
                  "titan_fused": ["--titan-kernels", "cuda", "--fused-projections", "1"],
                  "titan_float8": ["--titan-kernels", "cuda", "--fused-projections", "1", "--float8", "tensorwise"]}


def variants(shape):
    """titan's variants traced at a shape (no float8 row for a mixture of experts: its experts are no
    linear layers, and bench_moe has no float8 row)."""
    return tuple(v for v in TITAN_VARIANTS if not (v == "titan_float8" and shape.get("moe_experts")))


def shape_flags(shape):
    return [item for k, v in shape.items() for item in (f"--{k.replace('_', '-')}", str(v))]


def peers(shape):
    """The eager Python peers of a shape: torchtitan's Qwen3-MoE for a mixture of experts, else the
    plain FSDP2 Llama and torchtitan's Llama 3."""
    return ("torchtitan_moe",) if shape.get("moe_experts") else ("fsdp2", "torchtitan")


def trace_all(a, shape, out):
    """Writes titan.jsonl, its variants' and each peer's trace under `out`; returns the kernels of
    each, the peers' compiled rows included."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    site = Path(a.torchtitan_site)
    if not (site / "torchtitan").is_dir():
        subprocess.run([str(ROOT / "bench/side_by_side/install_torchtitan.sh"), str(site)], check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    flags = shape_flags(shape)
    run([a.trace, "--out", str(out / "titan.jsonl")] + flags, env)
    for variant in variants(shape):
        run([a.trace, *TITAN_VARIANTS[variant], "--out", str(out / f"{variant}.jsonl")] + flags, env)
    for impl in peers(shape):
        run([sys.executable, str(HERE / "trace_peers.py"), "--impl", impl, "--out", str(out / f"{impl}.jsonl")] + flags,
            env)
    traces = {impl: cm.kernels(cm.load(out / f"{impl}.jsonl")) for impl in ("titan",) + peers(shape) + variants(shape)}
    for impl in peers(shape):
        traces[impl + "_compile"] = cm.fuse(traces[impl])
    return traces


def run(cmd, env):
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    print(done.stdout.strip().splitlines()[-1], flush=True)


def table(traces, gpu_name, eff, shape, measured_runs):
    gpu = cm.GPUS[gpu_name]
    measured = measured_runs.get(gpu_name, {}).get("ms", {})
    sums = {impl: cm.summary(ks, gpu, eff) for impl, ks in traces.items()}
    titan, best = sums["titan"]["ms"], sums["titan_fused"]["ms"]
    lines = [f"GPU cost model, {gpu['name']} ({gpu['bf16_tflops']:.0f} TFLOP/s bf16, {gpu['hbm_tb_s']} TB/s); "
             f"efficiencies: matmul {eff['matmul']:.2f}, attention {eff['attention']:.2f}, "
             f"bandwidth {eff['bandwidth']:.2f}, {eff['launch_us']:.1f} us per launch; "
             f"dim {shape['dim']}, {shape['n_layers']} layers, vocab {shape['vocab_size']}, seq {shape['seq_len']}, "
             f"batch {shape['local_batch']}, {shape['dtype']}, AC {shape['ac']}",
             "| impl | kernels | memory-bound GB | matmul TFLOP | attention TFLOP | predicted ms | titan / this "
             "predicted | titan_fused / this predicted | "
             f"measured ms ({measured_runs.get(gpu_name, {}).get('when', 'none')}) | titan / this measured | "
             "predicted / measured ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for impl, s in sums.items():
        row = [impl, f"{s['kernels']:,}", f"{s['memory_gb']:.1f}", f"{s['matmul_tflop']:.1f}",
               f"{s['attention_tflop']:.1f}", f"{s['ms']:.1f}", f"{s['ms'] / titan:.3f}x" if impl != "titan" else "-",
               f"{s['ms'] / best:.3f}x" if impl != "titan_fused" else "-"]
        if impl in measured and "titan" in measured:
            m_ratio = measured[impl] / measured["titan"]
            p_ratio = s["ms"] / titan
            row += [f"{measured[impl]:.1f}", f"{m_ratio:.3f}x" if impl != "titan" else "-",
                    f"{100 * (p_ratio / m_ratio - 1):+.1f}%" if impl != "titan" else
                    f"{100 * (s['ms'] / measured[impl] - 1):+.1f}% (time)"]
        else:
            row += ["", "", ""]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Where titan's predicted time goes (ms): " + ", ".join(
        f"{kind} {ms:.1f}" for kind, ms in sorted(sums["titan"]["by_kind"].items(), key=lambda x: -x[1])))
    lines.append("titan's costliest memory-bound operators (op, calls, GB, ms): " + "; ".join(
        f"{op} {calls} {gb:.1f} {ms:.1f}" for op, calls, gb, ms in cm.top_memory_ops(traces["titan"], gpu, eff, 8)))
    return "\n".join(lines)


def parameter_counts(shape):
    """(the parameters each token multiplies through, every parameter): the first without the token
    embedding and with k of E experts per MoE block (the matmul FLOPs are 6 x it x tokens without
    AC), the second what AdamW walks."""
    dim, layers, vocab = shape["dim"], shape["n_layers"], shape["vocab_size"]
    head = shape.get("head_dim") or dim // shape["n_heads"]
    attention = dim * head * (2 * shape["n_heads"] + 2 * shape["n_kv_heads"])
    norms = 2 * dim + (2 * head if shape.get("qk_norm") else 0)
    if shape.get("moe_experts"):
        experts, expert = shape["moe_experts"], 3 * dim * shape["moe_hidden"]
        active, stored = experts * dim + shape["moe_top_k"] * expert, experts * dim + experts * expert  # gate, experts
    else:
        active = stored = 3 * dim * reference.hidden_dim(SimpleNamespace(**shape))  # the peers' feed-forward width
    body = layers * (attention + active) + vocab * dim  # the output projection
    return body, layers * (attention + stored + norms) + 2 * vocab * dim + dim


def check_shape(a, preset, out):
    """The checks at one small preset (see the module docstring); returns the failures."""
    failures = []
    base = dict(PRESETS[preset])
    shape = dict(base, ac="none")
    traces = trace_all(a, shape, out / "ac_none")
    eager = ("titan",) + peers(shape)
    body, parameters = parameter_counts(shape)
    tokens = shape["seq_len"] * shape["local_batch"]
    expected = 6.0 * body * tokens
    # torchtitan's MoE sums each token's k expert outputs by a bmm with its k weights (2·T·k·dim
    # FLOPs forward, twice that backward), and its per-operator AC recomputes that bmm and the
    # router's gate (per_op_sac_force_recompute_mm_shapes_by_fqns = ["moe.router.gate"], outside the
    # every-other count), which titan keeps: 2·T·dim·E more per layer.
    extra, extra_recomputed = {}, {}
    if shape.get("moe_experts"):
        combine = 2.0 * tokens * shape["moe_top_k"] * shape["dim"] * shape["n_layers"]
        gate = 2.0 * tokens * shape["dim"] * shape["moe_experts"] * shape["n_layers"]
        extra["torchtitan_moe"], extra_recomputed["torchtitan_moe"] = 3 * combine, combine + gate
    for impl in eager + variants(shape)[1:]:  # titan_fused, titan_float8
        ks = traces[impl]
        flops = sum(k["flops"] for k in ks if k["kind"] == "matmul") - extra.get(impl, 0)
        if flops != expected:
            failures.append(f"{preset} {impl}: matmul FLOPs {flops:.0f}, expected 6 x {body} x {tokens} = "
                            f"{expected:.0f}")
        fwd = sum(1 for k in ks if k["kind"] == "attention" and not k["op"].endswith("_backward"))
        bwd = sum(1 for k in ks if k["kind"] == "attention" and k["op"].endswith("_backward"))
        if (fwd, bwd) != (shape["n_layers"], shape["n_layers"]):
            failures.append(f"{preset} {impl}: {fwd} forward and {bwd} backward attention kernels, expected "
                            f"{shape['n_layers']} each")
        # AdamW steps every parameter, embedding included, once. Per element it reads and writes the
        # parameter and both moments (24 bytes in fp32), reads the gradient (and writes it back when
        # it clips inside the step: titan's trainer, grad_scale given) and, titan::adamw_copy_, writes
        # the compute copy: 28 bytes per fp32 parameter, 32 clipping, 30 for adamw_copy_ in bf16.
        adamw_ops = ("aten::_fused_adamw_", "titan::adamw_copy_")
        stepped, want = 0, 0
        for e in cm.load(out / "ac_none" / f"{impl}.jsonl"):
            name = cm.base_name(e["op"])
            if name not in adamw_ops:
                continue
            lists = [t for t in e["inputs"] if t["shape"] != []]
            n = len(lists) // cm.LIST_DEPTH[name]
            scaled = e["scalars"].get("grad_scale", "given") is not None
            copies = lists[4 * n:5 * n] if name == "titan::adamw_copy_" else [None] * n
            for p, g, c in zip(lists[:n], lists[n:2 * n], copies):
                stepped += p["elements"]
                want += p["elements"] * (6 * p["itemsize"] + g["itemsize"] * (2 if scaled else 1) +
                                         (c["itemsize"] if c else 0))
        adamw = sum(k["bytes"] for k in ks if cm.base_name(k["op"]) in adamw_ops)
        if stepped != parameters or not want <= adamw <= want + 4096:
            failures.append(f"{preset} {impl}: AdamW stepped {stepped} of {parameters} parameters and moved {adamw} "
                            f"bytes, expected {want} (+ step counts)")
    traces = trace_all(a, base, out / "ac_op")
    recomputed = {impl: sum(k["flops"] for k in traces[impl] if k["kind"] == "matmul") - expected - extra.get(impl, 0) -
                  extra_recomputed.get(impl, 0) for impl in eager}
    if recomputed["titan"] <= 0 or len(set(recomputed.values())) != 1:
        failures.append(f"{preset} per-operator AC: recomputed matmul FLOPs differ or are zero: {recomputed}")
    # Fused projections: fewer matmuls per block, so every other one is another choice; it still
    # recomputes some, never more than the unfused model.
    fused = sum(k["flops"] for k in traces["titan_fused"] if k["kind"] == "matmul") - expected
    if not 0 < fused <= recomputed["titan"]:
        failures.append(f"{preset} per-operator AC with fused projections: recomputed matmul FLOPs {fused}, "
                        f"expected more than 0 and at most the unfused model's {recomputed['titan']}")
    return failures


def check(a, out):
    """The ctest's checks at the dense and the mixture-of-experts small presets; returns the failures."""
    return check_shape(a, "small", out / "small") + check_shape(a, "small_moe", out / "small_moe")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--ac", help="override the preset's activation checkpointing: op, none, full or N")
    p.add_argument("--gpu", choices=sorted(cm.GPUS), action="append", help="GPU description(s); default all")
    p.add_argument("--trace", default=str(ROOT / "build/bench/gpu_cost/bench_gpu_cost_trace"),
                   help="the bench_gpu_cost_trace executable")
    p.add_argument("--torchtitan-site", default=str(ROOT / "build/torchtitan-site"))
    p.add_argument("--out", default="/tmp/titan_gpu_cost", help="traces and the table go here")
    p.add_argument("--calibrate", action="store_true", help="fit the efficiencies on the measured eager rows")
    p.add_argument("--check", action="store_true", help="the ctest's checks (see above)")
    a = p.parse_args()
    out = Path(a.out)
    if a.check:
        failures = check(a, out)
        for f in failures:
            print("FAILED:", f)
        print(f"gpu_cost checks: {'all passed' if not failures else f'{len(failures)} failed'}")
        return 1 if failures else 0
    shape = dict(PRESETS[a.preset])
    if a.ac:
        shape["ac"] = a.ac
    measured_runs = MEASURED.get(a.preset, {}) if shape["ac"] == PRESETS[a.preset]["ac"] else {}  # that shape only
    if a.calibrate and "H200" not in measured_runs:
        sys.exit(f"--calibrate fits measured H200 rows: MEASURED has none for preset {a.preset}"
                 + (" with --ac changed" if a.ac else ""))
    traces = trace_all(a, shape, out)
    eff = dict(cm.DEFAULT_EFFICIENCY)
    if a.calibrate:
        rows = {impl: (traces[impl], measured_runs["H200"]["ms"][impl]) for impl in ("titan",) + peers(shape)}
        eff = cm.calibrate(rows, cm.GPUS["H200"], fixed={"matmul": cm.MATMUL_ANCHOR})
        print("calibrated on the H200 eager rows:", eff)
    text = "\n\n".join(table(traces, g, eff, shape, measured_runs) for g in (a.gpu or sorted(cm.GPUS, reverse=True)))
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
