"""The example trainer on the GPU, checked against references (part of scripts/gpu/run.sh).

    python3 scripts/gpu/check_trainer.py --build gpu_kit/build --out OUT/trainer

1. fp32: the debug Llama 3 on CUDA against the same run on the CPU, every step's loss within 1e-4.
2. bf16 with each activation-checkpointing mode (none, full, every 2nd block, per operator): losses
   finite and within 5e-2 of the run without AC (recomputation must not change the function);
   tokens/s and peak memory per mode.
3. bf16 async checkpoint and resume: a run stopped at step 10 (async save) and resumed gives the
   losses of the uninterrupted run for steps 11-20, within 1e-2 (GPU kernels such as attention
   backward are not bitwise deterministic; on the CPU the same resume is bitwise, see
   tests/trainer/check_runs.py).
4. fp32 pipeline parallel 2 (1F1B) on 2 ranks sharing the GPU over Gloo (NCCL cannot put two ranks
   on one GPU): every step's loss within 1e-4 of the 1-rank run of check 1.
5. fp32 context parallel 2 (ring attention) on 2 ranks sharing the GPU over Gloo: every step's
   loss within 1e-4 of the 1-rank run of check 1.
6. float8 on Llama 3 1B (seq 2048, bf16 compute, the same batches, titan's CUDA kernels and fused
   projections): tensorwise with float8 FSDP all-gather and precomputed scales, and rowwise,
   against bf16 without float8: every loss within 0.1 of the bf16 run's, and tokens/s of each
   (the float8 row of docs/performance.md).
7. fp32 mixture of experts (the Qwen3-MoE debug model, expert bias): expert parallel 2, TP 2
   (sequence parallel) x EP 2 over the tp ranks, and TP 2 with each expert split over tp (ETP 2),
   on 2 ranks sharing the GPU over Gloo: every step's loss within 1e-4 of its 1-rank run.
8. bf16 with titan's CUDA kernels (training.fused_kernels = "cuda": the fused operators, and the
   one-rank FSDP units' bf16 copy written by titan::adamw_copy_), without and with fused
   projections, per-operator AC: every loss within 5e-2 of check 2's ATen-path run, and that the
   trainer reported the copy kept; tokens/s in check 2's table. The first run of those kernels in
   training.
9. bf16 Qwen3-MoE debug model with training.deterministic (ATen's deterministic algorithms, cuDNN's
   without autotuning, cuBLAS's fixed workspace; titan's MoE combine and dispatch need no atomics),
   twice, per-operator AC: bitwise the same loss at every step (the first run of that switch, and
   of the MoE layer's determinism, on a GPU; an operator without a deterministic kernel fails the
   run and is named in its log).
Prints one table; exits non-zero when a check fails.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", required=True, help="folder with tests/titan_launch and examples/trainer/titan_train")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--device", default="cuda", help="the device under test; 'cpu' dry-runs this script's logic")
    return p.parse_args()


class Runs:
    def __init__(self, a):
        self.a, self.out = a, Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def dry_run_shape(self):
        """On the CPU (a dry run of this script) a small batch: bf16 matmuls are slow there."""
        if self.a.device != "cpu":
            return {}
        return {"training.batch_size": 2, "training.global_batch_size": 2, "training.seq_len": 32}

    def train(self, name, device, overrides, fresh=True, nproc=1, config="examples/configs/llama3_debug.toml"):
        """Runs titan_train with `config` on `nproc` ranks (more than one share the device over
        Gloo); returns its metrics.jsonl training records (one per step; a MoE model's moe/...
        records are left out)."""
        dump = self.out / name
        if fresh:
            shutil.rmtree(dump, ignore_errors=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", TITAN_DEVICE=device,
                   TITAN_BACKEND="nccl" if device == "cuda" and nproc == 1 else "gloo", TITAN_SHARE_GPUS="1")
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        settings = {"job.dump_folder": str(dump), "metrics.log_freq": 1, "metrics.enable_tensorboard": "false",
                    "data.val_freq": 0, "checkpoint.enable": "false", "training.steps": self.a.steps,
                    "data.cache_dir": str(self.out / "token_cache"), **self.dry_run_shape(), **overrides}
        cmd = [f"{self.a.build}/tests/titan_launch", "--nproc", str(nproc), "--timeout", str(self.a.timeout), "--",
               f"{self.a.build}/examples/trainer/titan_train", "--config", config]
        for key, value in settings.items():
            cmd += [f"--{key}", str(value)]
        log = self.out / f"{name}.log"
        with open(log, "a") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{name}: titan_train exited with {rc}; see {log}")
        return [r for r in map(json.loads, open(dump / "metrics.jsonl")) if "loss" in r]


def loss_gap(a, b, steps):
    by_step = {r["step"]: r["loss"] for r in b}
    return max(abs(r["loss"] - by_step[r["step"]]) for r in a if r["step"] in steps)


def main():
    a = parse_args()
    runs = Runs(a)
    rows, failures = [], []

    def check(name, ok, detail):
        rows.append(f"| {name} | {'pass' if ok else 'FAIL'} | {detail} |")
        if not ok:
            failures.append(name)

    everything = set(range(1, a.steps + 1))
    fp32 = {"training.mixed_precision_param": "float32"}
    cuda, cpu = runs.train("fp32_cuda", a.device, fp32), runs.train("fp32_cpu", "cpu", fp32)
    gap = loss_gap(cuda, cpu, everything)
    check(f"fp32 {a.device} vs CPU, every step's loss", gap <= 1e-4, f"max |diff| {gap:.2e} (<= 1e-4)")

    modes = {"none": {"activation_checkpoint.mode": "none"},
             "full": {"activation_checkpoint.mode": "full"},
             "every 2nd block": {"activation_checkpoint.mode": "selective",
                                 "activation_checkpoint.selective_ac_option": "2"},
             "per operator": {"activation_checkpoint.mode": "selective",
                              "activation_checkpoint.selective_ac_option": "op"}}
    bf16 = {"training.mixed_precision_param": "bfloat16"}
    results = {name: runs.train("bf16_ac_" + name.replace(" ", "_"), a.device, {**bf16, **ac})
               for name, ac in modes.items()}
    perf, half = [], a.steps // 2

    def perf_row(name, records):
        """Check 2's table row of a run: tokens/s and peak memory over its second half."""
        timed = [r for r in records if r["step"] > half] or records
        return (f"| {name} | {sum(r['tokens_per_second_per_rank'] for r in timed) / len(timed):,.0f} | "
                f"{max(r.get('peak_memory_gib', 0) for r in timed):.3f} | "
                f"{max(r.get('peak_reserved_gib', 0) for r in timed):.3f} |")

    for name, records in results.items():
        finite = all(math.isfinite(r["loss"]) for r in records)
        gap = loss_gap(records, results["none"], everything)
        check(f"bf16 AC {name}: losses finite, same as no AC", finite and gap <= 5e-2, f"max |diff| {gap:.2e} (<= 5e-2)")
        perf.append(perf_row(name, records))

    per_op = {**bf16, **modes["per operator"]}
    for name, extra in (("titan kernels", {"training.fused_kernels": "cuda"}),
                        ("titan kernels + fused projections", {"training.fused_kernels": "cuda",
                                                               "model.fused_projections": "true"})):
        run = "bf16_" + name.replace(" ", "_").replace("+", "and")
        try:
            records = runs.train(run, a.device, {**per_op, **extra})
        except RuntimeError as error:
            check(f"bf16 {name}: trains", False, str(error))
            continue
        kept = "AdamW writes the bf16 copy" in (runs.out / f"{run}.log").read_text()
        gap = loss_gap(records, results["per operator"], everything)
        check(f"bf16 {name} (AC per operator): losses within 5e-2 of the ATen path, copy kept",
              kept and all(math.isfinite(r["loss"]) for r in records) and gap <= 5e-2,
              f"max |diff| {gap:.2e} (<= 5e-2), copy kept: {kept}")
        perf.append(perf_row(f"per operator, {name}", records))

    saving = {**bf16, "activation_checkpoint.mode": "selective", "activation_checkpoint.selective_ac_option": "op",
              "checkpoint.enable": "true", "checkpoint.interval": half, "checkpoint.async_mode": "async"}
    straight = runs.train("resume_straight", a.device, saving)
    runs.train("resume_split", a.device, {**saving, "training.stop_at_step": half})
    resumed = runs.train("resume_split", a.device, saving, fresh=False)
    later = set(range(half + 1, a.steps + 1))
    resumed_steps = sorted(r["step"] for r in resumed if r["step"] > half)
    gap = loss_gap([r for r in resumed if r["step"] > half], straight, later) if resumed_steps else math.inf
    check(f"bf16 async checkpoint at {half}, resume: losses of steps {half + 1}-{a.steps}",
          resumed_steps == sorted(later) and gap <= 1e-2, f"max |diff| {gap:.2e} (<= 1e-2)")

    # Two ranks sharing the GPU over Gloo (CUDA tensors) against the 1-rank run; a run that fails
    # is a failed check, and the table still prints.
    for name, what, overrides in (
            ("fp32_pp2", "fp32 pipeline parallel 2 (1F1B, 2 ranks)", {"parallelism.pipeline_parallel_degree": 2}),
            ("fp32_cp2", "fp32 context parallel 2 (ring, 2 ranks)",
             {"parallelism.context_parallel_degree": 2, "parallelism.context_parallel_rotate_method": "p2p"})):
        try:
            gap = loss_gap(runs.train(name, a.device, {**fp32, **overrides}, nproc=2), cuda, everything)
            check(f"{what} vs 1 rank, every step's loss", gap <= 1e-4, f"max |diff| {gap:.2e} (<= 1e-4)")
        except RuntimeError as error:
            check(f"{what} vs 1 rank, every step's loss", False, str(error))

    # Mixture of experts: EP 2, and EP 2 over the tp ranks, against the model's 1-rank run (the
    # global batch stays the config's; the CPU dry run's must split over 2 data ranks).
    moe_config = "examples/configs/qwen3_moe_debug.toml"
    moe = {**fp32, "parallelism.expert_parallel_degree": 1,
           **({"training.global_batch_size": 4} if a.device == "cpu" else {})}
    try:
        moe_one = runs.train("moe_one", a.device, moe, config=moe_config)
    except RuntimeError as error:
        moe_one = None
        check("fp32 Qwen3-MoE debug on 1 rank", False, str(error))
    for name, what, overrides in (
            ("moe_ep2", "fp32 Qwen3-MoE expert parallel 2 (2 ranks)", {"parallelism.expert_parallel_degree": 2}),
            ("moe_tp2_ep2", "fp32 Qwen3-MoE TP 2 x EP 2 over the tp ranks (2 ranks)",
             {"parallelism.expert_parallel_degree": 2, "parallelism.tensor_parallel_degree": 2,
              "parallelism.enable_sequence_parallel": "true", "parallelism.enable_loss_parallel": "true"}),
            ("moe_tp2_etp2", "fp32 Qwen3-MoE TP 2, each expert split over tp (ETP 2, 2 ranks)",
             {"parallelism.tensor_parallel_degree": 2, "parallelism.expert_tensor_parallel_degree": 2,
              "parallelism.enable_sequence_parallel": "true"})):
        if moe_one is None:
            break
        try:
            gap = loss_gap(runs.train(name, a.device, {**moe, **overrides}, nproc=2, config=moe_config), moe_one,
                           everything)
            check(f"{what} vs 1 rank, every step's loss", gap <= 1e-4, f"max |diff| {gap:.2e} (<= 1e-4)")
        except RuntimeError as error:
            check(f"{what} vs 1 rank, every step's loss", False, str(error))

    # The same bits twice with deterministic algorithms (the MoE model: its combine and dispatch).
    deterministic = {**per_op, "training.deterministic": "true", "parallelism.expert_parallel_degree": 1}
    try:
        first, second = (runs.train(f"moe_deterministic_{i}", a.device, deterministic, config=moe_config)
                         for i in (1, 2))
        differ = [r["step"] for r, s in zip(first, second) if r["loss"] != s["loss"]]
        check("bf16 Qwen3-MoE with training.deterministic, twice: bitwise the same losses",
              len(first) == a.steps and not differ, f"steps differing: {differ or 'none'}")
    except RuntimeError as error:
        check("bf16 Qwen3-MoE with training.deterministic, twice: bitwise the same losses", False, str(error))

    # Float8 pays off on large matmuls: a 1B model at seq 2048 (a dry run on the CPU keeps the debug model).
    # titan's kernels and fused projections in every run (float8's casts are one titan::float8_cast
    # kernel each; q, k, v and gate, up each from one cast of their input).
    big = {} if a.device == "cpu" else {"model.flavor": "1B", "training.seq_len": 2048, "training.batch_size": 2,
                                        "training.global_batch_size": 2, "activation_checkpoint.mode": "none",
                                        "training.fused_kernels": "cuda", "model.fused_projections": "true"}
    float8_perf, baseline = [], None
    for name, overrides in (("bf16", {}),
                            ("float8 tensorwise, float8 all-gather", {
                                "float8.enable": "true", "float8.enable_fsdp_float8_all_gather": "true",
                                "float8.precompute_float8_dynamic_scale_for_fsdp": "true"}),
                            ("float8 rowwise", {"float8.enable": "true", "float8.recipe_name": "rowwise"})):
        try:
            records = runs.train("float8_" + name.split(",")[0].replace(" ", "_"), a.device, {**bf16, **big, **overrides})
        except RuntimeError as error:
            check(f"{name}: trains", False, str(error))
            continue
        timed = [r for r in records if r["step"] > half] or records
        tps = sum(r["tokens_per_second_per_rank"] for r in timed) / len(timed)
        if baseline is None:
            baseline = (records, tps)
        else:
            gap = loss_gap(records, baseline[0], everything)
            check(f"{name}: every loss within 0.1 of bf16's", gap <= 0.1, f"max |diff| {gap:.2e} (<= 0.1)")
        float8_perf.append(f"| {name} | {tps:,.0f} | {tps / baseline[1]:.2f}x | "
                           f"{max(r.get('peak_memory_gib', 0) for r in timed):.3f} |")

    table = "\n".join([f"| trainer check on {a.device} | result | detail |", "|---|---|---|", *rows, "",
                       "| bf16 AC mode (debug model) | tokens/s | peak active GiB | peak reserved GiB |",
                       "|---|---|---|---|", *perf, "",
                       f"| Llama 3 {big.get('model.flavor', 'debug')} compute | tokens/s | vs bf16 | peak active GiB |",
                       "|---|---|---|---|", *float8_perf])
    (runs.out / "table.md").write_text(table + "\n")
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
