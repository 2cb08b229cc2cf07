"""titan's trainer side by side with PyTorch FSDP2 (eager, compiled) and torchtitan: one table.

    .venv/bin/python bench/side_by_side/run.py --device cpu     # 2 Gloo ranks, debug Llama 3, fp32
    python3 bench/side_by_side/run.py --device cuda             # 1 GPU, Llama 3 1B, seq 8192, bf16
    python3 bench/side_by_side/run.py --device cuda --shape 8B  # 1 GPU, Llama 3 8B's shape, 8 layers
    .venv/bin/python bench/side_by_side/run.py --device cpu --model qwen3_moe   # MoE, EP 2 on 2 Gloo ranks
    python3 bench/side_by_side/run.py --device cuda --model qwen3_moe  # 1 GPU, Qwen3-30B-A3B's blocks, 4 layers

Every row trains the same Llama 3 shape with the same batch, optimizer (AdamW, clipping at 1.0),
FSDP (reshard after forward) and activation checkpointing, in this one run on this one machine:
  titan               examples/trainer/titan_train (the trainer a user copies) on the offline corpus
  titan_kernels       the same with training.fused_kernels = "cuda" (titan's CUDA kernels; cuda preset)
  titan_fused         titan_kernels with model.fused_projections = true (wq|wk|wv, w1|w3 one GEMM each)
  titan_float8        titan_fused with float8.enable = true (float8 linear layers, their casts by
                      titan's float8 cast kernels, in the layouts the matmuls take, q|k|v and
                      gate|up each from one cast of their input; cuda preset): against
                      titan_fused, float8's gain
  fsdp2, fsdp2_compile, torchtitan, torchtitan_compile: bench/side_by_side/reference.py
  --model qwen3_moe: titan's qwen3_moe model (examples/configs/qwen3_moe_debug.toml: q/k norms,
        the expert-bias update) against torchtitan's own Qwen3-MoE at the same shape and EP
        degree (torchtitan_moe: grouped GEMMs, its default; torchtitan_moe_compile: with its
        compile; torchtitan_moe_loop: its per-expert loop), through reference.py. cpu: the debug
        flavor (8 experts, top-2, expert width 64) with expert parallelism 2 over the 2 FSDP
        ranks; cuda: the 30B-A3B flavor's blocks (128 experts of width 768, top-8, head_dim 128,
        vocab 151936) with 4 of its 48 layers on one GPU, bf16, per-operator AC (the GPU cost
        model's preset gpu_moe).
torchtitan rows need torchtitan 0.2.2 and what it imports in `--torchtitan-site` (CPU:
bench/side_by_side/install_torchtitan.sh build/torchtitan-site; GPU: scripts/gpu/ brings them);
without them those rows say "not installed" and the error.

Presets (override any with the flags below):
  cpu:  2 ranks, dim 256, 4 layers, 8 heads, 2 kv heads, the 4k tokenizer's vocabulary, seq 128,
        4 sequences per rank, global batch 16 (2 accumulation steps), AC every 2nd block, fp32.
  cuda: 1 rank, Llama 3 1B shape (dim 2048, 16 layers, 32/8 heads, vocab 128256), seq 8192,
        1 sequence, bf16 parameters with fp32 reduction, per-operator selective AC.
  --shape 8B (cuda): Llama 3 8B's shape with 8 of its 32 layers (dim 4096, 32/8 heads, hidden
        14336, vocab 128256; 2.8B parameters), which fills the GPU's matmul units: the MFU figure.
tokens/s per rank is the mean after `--warmup` steps over `--steps` steps; MFU counts torchtitan's
6N + 12LHQT FLOPs per token against the measured bf16 matmul peak (cuda) or is left out (cpu).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from reference import hidden_dim  # bench/side_by_side/reference.py: the feed-forward width of a shape

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {
    "cpu": dict(ranks=2, flavor="debug", dim=256, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=64,
                ffn_dim_multiplier=None, vocab_size=None, seq_len=128, local_batch=4, global_batch=16,
                dtype="float32", ac="2", impls="titan,fsdp2,torchtitan", warmup=5, steps=10),
    "cuda": dict(ranks=1, flavor="1B", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                 ffn_dim_multiplier=1.5, vocab_size=128256, seq_len=8192, local_batch=1, global_batch=1,
                 dtype="bfloat16", ac="op",
                 impls="titan,titan_kernels,titan_fused,titan_float8,fsdp2,fsdp2_compile,torchtitan,"
                       "torchtitan_compile",
                 warmup=10, steps=20),
}
# --model: the trainer config of the titan rows, and per device what changes for every row. qwen3_moe's
# shapes are its flavors' (examples/models/llama/model.cpp: debug on the cpu, 30B-A3B with 4 of its
# layers on cuda): the torchtitan rows take them.
MODELS = {
    "llama3": dict(config="examples/configs/llama3_debug.toml"),
    "qwen3_moe": dict(config="examples/configs/qwen3_moe_debug.toml",
                      cpu=dict(impls="titan,torchtitan_moe,torchtitan_moe_loop", moe_experts=8, moe_top_k=2,
                               moe_hidden=64, ep=2),
                      cuda=dict(impls="titan,titan_kernels,titan_fused,torchtitan_moe,torchtitan_moe_compile",
                                flavor="30B-A3B", dim=2048, n_layers=4, n_heads=32, n_kv_heads=4, head_dim=128,
                                vocab_size=151936, moe_experts=128, moe_top_k=8, moe_hidden=768, ep=1)),
}
MOE_KEYS = ("moe_experts", "moe_top_k", "moe_hidden", "ep", "head_dim")
# A second cuda shape (--shape): the preset's model replaced, everything else kept.
SHAPES = {"8B": dict(flavor="8B", dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, multiple_of=1024,
                     ffn_dim_multiplier=1.3)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], required=True)
    p.add_argument("--build", default=os.environ.get("BUILD_DIR", str(ROOT / "build")), help="titan build folder")
    p.add_argument("--out", default="/tmp/titan_side_by_side", help="logs and the table go here")
    p.add_argument("--python", default=sys.executable, help="the Python with torch (and torchtitan)")
    p.add_argument("--torchtitan-site", default=str(ROOT / "build/torchtitan-site"),
                   help="a folder holding torchtitan and its dependencies (bench/side_by_side/install_torchtitan.sh)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per row")
    p.add_argument("--titan-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="an extra config override for the titan rows (repeatable), e.g. profiling.enable_profiling=true")
    p.add_argument("--shape", choices=sorted(SHAPES), help="another model shape (cuda): see above")
    p.add_argument("--model", choices=sorted(MODELS), default="llama3", help="llama3, or qwen3_moe: see above")
    for key, value in PRESETS["cuda"].items():
        kind = float if key == "ffn_dim_multiplier" else int if isinstance(value, int) else str
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
    a = p.parse_args()
    if a.shape and a.device != "cuda":
        p.error("--shape is a cuda shape (the cpu preset trains the debug model)")
    model = MODELS[a.model].get(a.device, {})
    for key, value in {**PRESETS[a.device], **SHAPES.get(a.shape, {}), **model}.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return a


def head_dim(a):
    """Each attention head's width: the preset's head_dim (Qwen3-MoE's 128), else dim / n_heads."""
    return getattr(a, "head_dim", None) or a.dim // a.n_heads


def body_parameters(a, active=False):
    """Parameters other than the two vocabulary matrices (attention, feed-forward or router and
    experts, norms; Qwen3-MoE's q/k norms); `active`: those a token goes through (top-k experts)."""
    head = head_dim(a)
    attention = a.dim * head * (2 * a.n_heads + 2 * a.n_kv_heads)
    if getattr(a, "moe_experts", None):
        experts = a.moe_top_k if active else a.moe_experts
        block = attention + 2 * head + a.moe_experts * a.dim + experts * 3 * a.dim * a.moe_hidden
    else:
        block = attention + 3 * a.dim * hidden_dim(a)
    return a.n_layers * (block + 2 * a.dim) + a.dim


def flops_per_token(a):
    """torchtitan's estimate: 6 x (parameters without the token embedding; a mixture of experts'
    active ones) + 12 L H Q T."""
    attention = 12 * a.n_layers * a.n_heads * head_dim(a) * a.seq_len
    return 6 * (body_parameters(a, active=True) + a.vocab_size * a.dim) + attention


def matmul_peak_flops(python):
    """The bf16 matmul rate this GPU reaches (8192^3, median of 20 after warm-up), FLOP/s."""
    code = (
        "import torch\n"
        "a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))\n"
        "for _ in range(5): a @ b\n"
        "times = []\n"
        "for _ in range(20):\n"
        "  s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)\n"
        "  s.record(); a @ b; e.record(); e.synchronize(); times.append(s.elapsed_time(e) / 1e3)\n"
        "times.sort(); print(2 * 8192**3 / times[len(times) // 2])\n"
    )
    return float(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout)


def run(cmd, env, log, timeout):
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
            return done.returncode
        except subprocess.TimeoutExpired:
            f.write(f"\ntimed out after {timeout} s\n")
            return 124


# impl -> the trainer's extra overrides: titan's CUDA kernels; those and the fused projections;
# those and float8 linear layers (the config's float8 settings: tensorwise, the output layer kept in
# bf16).
TITAN_ROWS = {"titan": {}, "titan_kernels": {"training.fused_kernels": "cuda"},
              "titan_fused": {"training.fused_kernels": "cuda", "model.fused_projections": "true"},
              "titan_float8": {"training.fused_kernels": "cuda", "model.fused_projections": "true",
                               "float8.enable": "true"}}


def titan_row(a, impl, env, out):
    dump = out / impl
    shutil.rmtree(dump, ignore_errors=True)
    steps = a.warmup + a.steps
    overrides = {
        "job.dump_folder": str(dump), "model.flavor": a.flavor, "model.n_layers": a.n_layers,
        "training.steps": steps,
        "training.batch_size": a.local_batch, "training.global_batch_size": a.global_batch,
        "training.seq_len": a.seq_len, "training.mixed_precision_param": a.dtype,
        "training.mixed_precision_reduce": "float32", "lr_scheduler.warmup_steps": 2,
        "activation_checkpoint.mode": {"none": "none", "full": "full"}.get(a.ac, "selective"),
        "activation_checkpoint.selective_ac_option": a.ac if a.ac not in ("none", "full") else "2",
        "checkpoint.enable": "false", "data.val_freq": 0, "metrics.enable_tensorboard": "false",
        "metrics.log_freq": a.warmup, "data.cache_dir": str(out / "token_cache"), **TITAN_ROWS[impl],
    }
    if a.model != "llama3":
        overrides["parallelism.expert_parallel_degree"] = a.ep
    for item in a.titan_set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--titan-set '{item}': expected SECTION.KEY=VALUE")
        overrides[key] = value
    cmd = [f"{a.build}/tests/titan_launch", "--nproc", str(a.ranks), "--timeout", str(a.timeout), "--",
           f"{a.build}/examples/trainer/titan_train", "--config", MODELS[a.model]["config"]]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    log = out / f"{impl}.log"
    rc = run(cmd, env, log, a.timeout)
    if rc != 0:
        return {"error": f"exit {rc}, see {log}"}
    # one record per logging interval (steps 1, warmup, 2 x warmup, ..., last): time the ones after warm-up
    records = [json.loads(line) for line in open(dump / "metrics.jsonl")]
    records = [r for r in records if "step_seconds" in r]  # the training records (not moe/..., validation)
    previous = {r["step"]: p["step"] for p, r in zip(records, records[1:])}
    after = [r for r in records if r["step"] > a.warmup]
    seconds = sum(r["step_seconds"] * (r["step"] - previous[r["step"]]) for r in after)
    if a.vocab_size is None:  # the debug flavor takes the tokenizer's vocabulary: read it off the count
        total = int(re.search(r": (\d+) parameters", log.read_text()).group(1))
        a.vocab_size = (total - body_parameters(a)) // (2 * a.dim)
    step_tokens = a.local_batch * a.seq_len * (a.global_batch // (a.local_batch * a.ranks))  # per rank
    return {"tokens_per_s_per_rank": step_tokens * a.steps / seconds, "step_ms": 1e3 * seconds / a.steps,
            "loss": records[-1]["loss"], "peak_active_gib": max(r.get("peak_memory_gib", 0) for r in after),
            "peak_reserved_gib": max(r.get("peak_reserved_gib", r.get("peak_memory_gib", 0)) for r in after)}


def reference_row(a, impl, env, out):
    if impl.startswith("torchtitan"):
        probe = subprocess.run([a.python, "-c", "import torchtitan.models.llama3"], env=env, capture_output=True,
                               text=True)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return {"error": f"torchtitan not installed (see --torchtitan-site): {last}"}
    torchrun = [a.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.ranks)]
    cmd = torchrun + [str(ROOT / "bench/side_by_side/reference.py"), "--impl", impl, "--device", a.device]
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "vocab_size",
                "seq_len", "local_batch", "global_batch", "dtype", "ac", "warmup", "steps",
                *(MOE_KEYS if a.model != "llama3" else ())):
        value = getattr(a, key, None)  # head_dim: set by the cuda MoE preset only
        if value is not None:
            cmd += ["--" + key.replace("_", "-"), str(value)]
    log = out / f"{impl}.log"
    rc = run(cmd, env, log, a.timeout)
    rows = [json.loads(line) for line in open(log) if line.startswith("{")]
    if rc != 0 or not rows:
        return {"error": f"exit {rc}, see {log}"}
    return rows[-1]


def write_table(a, impls, results, peak, out):
    """table.md (one row per implementation; those not run yet say so) and results.json."""
    fpt = flops_per_token(a)
    moe = (f", {a.moe_experts} experts top-{a.moe_top_k} width {a.moe_hidden}, EP {a.ep}" if a.model != "llama3" else "")
    # The ratio columns: titan's default row, and titan_fused (all of titan's kernels) where it ran.
    bases = [name for name in ("titan", "titan_fused") if "tokens_per_s_per_rank" in results.get(name, {})]
    lines = [f"side by side on {a.device}: {a.model}, {a.ranks} rank(s), dim {a.dim}, {a.n_layers} layers{moe}, vocab {a.vocab_size}, "
             f"seq {a.seq_len}, local batch {a.local_batch}, global batch {a.global_batch}, {a.dtype}, AC {a.ac}"
             + (f", matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""),
             "| " + " | ".join(["impl", "tokens/s/rank", "step ms", "MFU", "peak active GiB", "peak reserved GiB",
                                 "last loss"] + [f"{base} / this" for base in bases]) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(bases)]
    for impl in impls:
        r = results.get(impl, {"error": "not run yet"})
        if "error" in r:
            lines.append(f"| {impl} | {r['error']} | | | | | |" + " |" * len(bases))
            continue
        tps = r["tokens_per_s_per_rank"]
        mfu = f"{100 * tps * fpt / peak:.1f}%" if peak else "n/a"
        loss = f"{r['loss']:.4f}" if "loss" in r else ""
        ratios = "".join(f" {results[base]['tokens_per_s_per_rank'] / tps:.2f}x |" for base in bases)
        lines.append(f"| {impl} | {tps:,.0f} | {r['step_ms']:.1f} | {mfu} | {r['peak_active_gib']:.2f} | "
                     f"{r['peak_reserved_gib']:.2f} | {loss} |{ratios}")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "peak_flops": peak, "rows": results}, indent=1))


def main():
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    if a.device == "cpu":
        env.update(TITAN_DEVICE="cpu", TITAN_BACKEND="gloo", CUDA_VISIBLE_DEVICES="")
    else:  # titan_launch defaults to CPU and Gloo: ask for the GPU (ranks beyond one per GPU share it)
        env.update(TITAN_DEVICE="cuda", TITAN_BACKEND="nccl" if a.ranks == 1 else "gloo", TITAN_SHARE_GPUS="1")
    if Path(a.torchtitan_site).is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [a.torchtitan_site, env.get("PYTHONPATH")]))
    if a.steps % a.warmup != 0:
        sys.exit(f"--steps ({a.steps}) must be a multiple of --warmup ({a.warmup}): titan logs every warmup steps")
    impls = a.impls.split(",")
    if a.vocab_size is None and impls[0] != "titan":
        sys.exit("the debug flavor takes its vocabulary from titan's run: list titan first or pass --vocab-size")
    peak = matmul_peak_flops(a.python) if a.device == "cuda" else 0.0
    results = {}
    for impl in impls:  # titan first: on the debug flavor it tells the vocabulary the others use
        started = time.time()
        results[impl] = titan_row(a, impl, env, out) if impl in TITAN_ROWS else reference_row(a, impl, env, out)
        print(f"[side_by_side] {impl}: {time.time() - started:.0f} s {json.dumps(results[impl])}", flush=True)
        write_table(a, impls, results, peak, out)  # after every row: a run cut short keeps the rows it has
    print((out / "table.md").read_text(), end="")
    return 0 if all("error" not in results[i] or "not installed" in results[i]["error"] for i in impls) else 1


if __name__ == "__main__":
    sys.exit(main())
