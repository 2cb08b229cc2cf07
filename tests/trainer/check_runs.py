"""End-to-end runs of the example trainers on the real corpus, checked against each other.

Each scenario launches `titan_launch --nproc N -- <trainer> --config ...` with small overrides
(seq_len 32, 20 steps, a metric line per step) and compares what the runs wrote:

  resume      20 steps straight == 10 steps + checkpoint + resume + 10 steps (2 ranks, FSDP):
              every step's loss and every exported weight bitwise
  sigterm     SIGTERM to the launcher after step 3 (forwarded to the ranks, as by Slurm or
              torchrun): exit 0 after saving that step; the resumed run equals the straight one bitwise
  reshard     10 steps on 2 ranks, resumed on 1 rank (same global batch through accumulation):
              losses and weights equal the straight run within fp32 reduction-order tolerance
  tp          FSDP 2 x TP 2 on 4 ranks with sequence and loss parallel: the straight run's losses
  bf16        bf16 compute with fp32 master weights and fp32 gradient reduction: losses and the
              exported (fp32 master) weights within 2e-2 of the fp32 run (measured: 1.6e-3, 5.5e-3);
              on 1 rank, training.fused_kernels = "cuda" (the unit keeps its bf16 copy, FusedAdamW
              writes it with titan::adamw_copy_, its ATen path here) gives bitwise the losses and
              weights of the run without it (where the trainer links titan::cuda_kernels)
  fused       model.fused_projections (wq|wk|wv and w1|w3 as one GEMM each) on 2 ranks: the straight
              run's losses and weights within 1e-4; and the straight run's step-10 checkpoint
              resumed with the option: its steps 11..20
  deterministic  training.deterministic (ATen's deterministic algorithms; uninitialized memory
              filled with NaN) on 2 ranks: the trainer says so, and the straight run's losses and
              weights come back bitwise (on the CPU every kernel is deterministic already)
  wsd         a warmup-stable-decay schedule (lr_scheduler.decay_ratio 0.25, sqrt decay) on 2 ranks:
              every step's logged lr is optimizer.lr times the documented factor (warmup 1-2,
              stable 3-15, decay 16-20 to min_lr_ratio)
  hf_start    2 ranks start from the straight run's Hugging Face export (each rank reads its
              slices) and train one step at lr 0: the exported weights come back bitwise
  torchrun    the same job launched by PyTorch's torchrun (--standalone --no-python) instead of
              titan_launch: bitwise the same losses
  restart     torchrun --max-restarts 1, rank 1 killed (SIGKILL) after step 12: torchrun restarts
              both workers, which resume from the step-10 checkpoint and finish: every step's last
              loss and the exported weights equal the straight run bitwise
  multinode   HSDP (2 replicas x 2 shards) on 4 ranks launched as two "nodes" of 2 on this machine:
              two `torchrun --nnodes 2` launchers meeting at a c10d rendezvous, and 4 processes
              with the Slurm variables of a 2-node job; both give bitwise the losses of the same
              job on one node (the shard groups are the ranks of one node)
  pp          pipeline parallel 2 x FSDP 2 on 4 ranks (1F1B, 2 micro-batches per step): the straight
              run's losses, validation and weights; its step-10 checkpoint resumed without pipeline
              parallelism (2 ranks), and the straight run's step-10 checkpoint resumed with it; PP 2
              starts from the straight run's Hugging Face export and exports it back bitwise
  pp_schedules  PP 2 on 2 ranks with Interleaved1F1B (4 stages of one layer) and with ZBH1 (no
              activation checkpointing): the straight run's losses and weights
  cp          context parallel 2 (load-balanced sequence halves, all-gather K/V) on 2 ranks, the same
              with the ring (p2p), CP 2 x FSDP 2 (FSDP over dp_shard x cp), CP 2 x TP 2 and CP 2 x PP 2
              on 4 ranks: the straight run's losses, validation and weights; CP 2 x FSDP 2's step-10
              checkpoint resumed without CP (2 ranks) and the straight run's resumed with CP 2
  mistral_cp  Mistral at seq_len 256 (its 128-token sliding window cuts the sequence): CP 2 with the
              ring on 2 ranks gives the 2-rank FSDP run's losses and weights
  float8      float8 linear layers (tensorwise; emulated where this CPU's _scaled_mm is oneDNN's
              reference kernel, seconds per GEMM) with and without float8 FSDP all-gather (and
              precomputed scales), and with fused projections, on 2 ranks: bitwise the same losses
              and weights; FSDP 2 x TP 2 (fused projections) in float8 within FLOAT8_TP_TOL of
              FSDP 2; 50 steps of bf16 compute with float8 tensorwise
              and rowwise: every loss within FLOAT8_TRACK_TOL of the bf16 run's
  no_labels   Alpaca rows of 16 tokens hold only prompt: every step is skipped with a warning,
              and the run still ends with its checkpoint and export
  moe         the Qwen3-MoE debug model (expert bias) with expert parallelism 2 on 2 ranks: the
              1-rank run's losses and exported weights, and so do PP 2 x EP 2 on 4 ranks, TP 2 x
              EP 2 and CP 2 x EP 2 on 2 ranks (ep borrowing the tp, then the cp ranks), TP 2 with
              each expert split over tp (ETP 2) on 2 ranks and with EP 2 on 4; its step-10
              checkpoint resumed at EP 1 on 1 rank and at EP 4 on 4 gives its steps 11..20 (TP 2 x
              EP 2's and TP 2 x ETP 2 x EP 2's at EP 1 on 1 rank, their own); the
              Mixtral debug model (auxiliary loss, EP 2): finite losses and auxiliary losses, a
              Hugging Face export that transformers loads; the 1-rank run with
              training.deterministic: bitwise its losses and weights
  qwen3       the dense Qwen3 debug model (q/k norms) with TP 2 and sequence parallel on 2 ranks,
              and the Qwen2.5 one (q/k/v biases) with TP 2 and fused projections: the 1-rank runs'
              losses and exported weights; the exports load as Qwen3ForCausalLM / Qwen2ForCausalLM
  tied        Llama 3.2 (output tied to the embedding) under FSDP 2 and under TP 2 (loss parallel,
              with and without sequence parallel): the 1-rank run's losses and weights; the export says
              tie_word_embeddings, holds no lm_head.weight and loads
  doc_mask    block-causal attention (model.attn_mask_type) on packed conversations: FSDP 2, TP 2
              with sequence parallel, PP 2 (1F1B, 4 micro-batches), CP 2 (all-gather and ring) and
              CP 2 x PP 2 on 4 ranks against the 1-rank run; the 1-rank causal run differs
  mistral     the Mistral trainer on its debug config (JSONL corpus): finite metrics, validation
  alpaca      instruction tuning on the GCIDE Alpaca set: finite metrics, validation
  chat        instruction tuning of the Qwen3 debug model on GCIDE conversations in Qwen3's chat
              format (the rendering's parity is trainer.chat_parity's): finite metrics, validation
  chat_llama2 the same conversations for the Llama 2 debug model in Llama 2 chat's format with the
              SentencePiece tokenizer: finite metrics, validation

Usage: check_runs.py --launch titan_launch --trainer titan_train
                     --source SRC --workdir DIR [--only NAME ...]
"""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file

SMALL = [
    "--training.seq_len", "32", "--training.batch_size", "2", "--training.global_batch_size", "4",
    "--training.steps", "20", "--lr_scheduler.warmup_steps", "4", "--metrics.log_freq", "1",
    "--metrics.enable_tensorboard", "false", "--checkpoint.enable", "true", "--checkpoint.interval", "10",
    "--checkpoint.keep_latest_k", "0", "--data.val_freq", "10", "--data.val_steps", "2",
    "--training.mixed_precision_param", "float32",
]


# Float8 against bf16 over 50 steps, and FSDP x TP against FSDP in float8: about 4x what was measured
# on 2026-11-26 (8.1e-3 tensorwise, 7.8e-3 rowwise; 7.4e-4 with TP; docs/performance.md). TP changes
# the order of partial sums, and a last-bit difference can move a value to the next float8 step.
FLOAT8_TRACK_TOL = 0.03
FLOAT8_TP_TOL = 3e-3


class Runner:
    def __init__(self, args):
        self.args = args
        self.failures = []

    def run(self, name, trainer, nproc, config, extra=(), signal_after_step=None, torchrun=False,
            kill_rank1_after_step=None, max_restarts=0):
        """Runs one trainer job in <workdir>/<name> and returns its combined output; it must exit 0.
        With signal_after_step, the launcher gets SIGTERM once metrics.jsonl shows that step; with
        kill_rank1_after_step, the rank-1 worker gets SIGKILL then; with torchrun, PyTorch's
        launcher (allowed max_restarts restarts) starts the ranks instead of titan_launch."""
        dump = os.path.join(self.args.workdir, name)
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--no-python", "--nproc_per_node",
                     str(nproc), "--max-restarts", str(max_restarts)]
                    if torchrun else [self.args.launch, "--nproc", str(nproc), "--timeout", "600", "--"])
        after_step = signal_after_step if signal_after_step is not None else kill_rank1_after_step
        cmd = [*launcher, trainer, "--config",
               os.path.join(self.args.source, "examples", "configs", config), "--job.dump_folder", dump,
               "--data.cache_dir", os.path.join(self.args.workdir, "token_cache"), *SMALL, *extra]
        start = time.time()
        with tempfile.TemporaryFile("w+") as output:
            proc = subprocess.Popen(cmd, cwd=self.args.source, stdout=output, stderr=subprocess.STDOUT, text=True)
            while after_step is not None and proc.poll() is None:
                try:
                    reached = after_step in metrics(dump)[0]
                except (OSError, ValueError):  # not written yet, or a line being written
                    reached = False
                if reached:
                    if signal_after_step is not None:
                        proc.send_signal(signal.SIGTERM)
                    else:
                        kill_worker(dump, rank=1)
                    break
                time.sleep(0.02)
            code = proc.wait()
            output.seek(0)
            text = output.read()
        print(f"--- {name}: {nproc} ranks, exit {code}, {time.time() - start:.1f} s", flush=True)
        if code != 0:
            print(text)
            raise AssertionError(f"{name}: exit code {code}: {' '.join(cmd)}")
        return text

    def run_nodes(self, name, trainer, config, extra, how):
        """Runs a 4-rank job as two 2-rank "nodes" of this machine: two torchrun launchers meeting at
        a c10d rendezvous (how="torchrun"), or 4 processes with the variables srun gives a 2-node,
        2-tasks-per-node job (how="slurm"). Every process must exit 0; returns their outputs."""
        dump = os.path.join(self.args.workdir, name)
        trainer_cmd = [trainer, "--config", os.path.join(self.args.source, "examples", "configs", config),
                       "--job.dump_folder", dump, "--data.cache_dir", os.path.join(self.args.workdir, "token_cache"),
                       *SMALL, *extra]
        port = free_port()
        if how == "torchrun":
            jobs = [([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                      "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", name,
                      "--no-python", *trainer_cmd], dict(os.environ)) for _ in range(2)]
        else:
            jobs = [(trainer_cmd, dict(os.environ, SLURM_PROCID=str(i), SLURM_NTASKS="4", SLURM_STEP_ID="0",
                                       SLURM_LOCALID=str(i % 2), SLURM_NTASKS_PER_NODE="2",
                                       SLURM_JOB_NODELIST="localhost,localhost",
                                       MASTER_PORT=str(port)))
                    for i in range(4)]
        start = time.time()
        outputs = []
        procs = []
        for cmd, env in jobs:
            output = tempfile.TemporaryFile("w+")
            procs.append((subprocess.Popen(cmd, cwd=self.args.source, stdout=output, stderr=subprocess.STDOUT,
                                           text=True, env=env), output))
        codes = [proc.wait(timeout=600) for proc, _ in procs]
        for _, output in procs:
            output.seek(0)
            outputs.append(output.read())
            output.close()
        print(f"--- {name}: 4 ranks as 2 nodes ({how}), exit {codes}, {time.time() - start:.1f} s", flush=True)
        if any(codes):
            print("\n".join(outputs))
            raise AssertionError(f"{name}: exit codes {codes}")
        return outputs

    def check(self, condition, message):
        print(("ok   " if condition else "FAIL ") + message, flush=True)
        if not condition:
            self.failures.append(message)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_worker(dump, rank, variable="RANK"):
    """SIGKILL to the trainer process of `rank` (its environment's `variable`) writing to `dump`
    (found through /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if dump.encode() in cmdline and f"{variable}={rank}".encode() in environ:
            os.kill(int(pid), signal.SIGKILL)
            return
    raise AssertionError(f"no trainer process of rank {rank} writing to {dump}")


def scaled_mm_is_reference_kernel():
    """Whether one float8 [256, 512] x [512, 512] torch._scaled_mm takes over 0.2 s on this CPU
    (an AVX2 machine takes ~1 ms; oneDNN's reference kernel seconds)."""
    torch.set_num_threads(1)
    a = torch.randn(256, 512).to(torch.float8_e4m3fn)
    b = torch.randn(512, 512).to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0)
    start = time.time()
    torch._scaled_mm(a, b, one, one, out_dtype=torch.float32)
    return time.time() - start > 0.2


def metrics(dump):
    """step -> record of the training lines (with a step's other scalars, such as moe/..., merged
    in), and step -> validation record, from metrics.jsonl. A later record's keys win."""
    train, val = {}, {}
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            (val if "val/loss" in record else train).setdefault(record["step"], {}).update(record)
    return train, val


def weights(dump):
    return load_file(os.path.join(dump, "export", "model.safetensors"))


def equal_steps(run, reference):
    """The steps 1..20 at which `run` logged bitwise the loss `reference` did (metrics() records)."""
    return [s for s in range(1, 21) if run.get(s, {}).get("loss") == reference[s]["loss"]]


def max_weight_diff(a, b):
    assert a.keys() == b.keys(), f"exported names differ: {sorted(set(a) ^ set(b))}"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--launch", required=True)
    parser.add_argument("--trainer", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--cuda-kernels", type=int, default=1,
                        help="1 where the trainer links titan::cuda_kernels (training.fused_kernels = \"cuda\")")
    args = parser.parse_args()
    for key in ("launch", "trainer", "source", "workdir"):  # the runs start in --source
        setattr(args, key, os.path.abspath(getattr(args, key)))
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    r = Runner(args)
    wanted = lambda name: args.only is None or name in args.only
    work = lambda name: os.path.join(args.workdir, name)
    llama = "llama3_debug.toml"

    r.run("straight", args.trainer, 2, llama)
    straight, straight_val = metrics(work("straight"))
    straight_weights = weights(work("straight"))
    r.check(sorted(straight) == list(range(1, 21)), f"straight run logged steps 1..20: {sorted(straight)}")
    r.check(sorted(straight_val) == [10, 20], "validation at steps 10 and 20")
    losses = [straight[s]["loss"] for s in range(1, 21)]
    r.check(all(math.isfinite(x) for x in losses), "finite losses")
    r.check(os.path.isfile(os.path.join(work("straight"), "checkpoint", "step-20", "metadata.json")),
            "final checkpoint saved")

    def compare_runs(name, reference, what, steps=range(1, 21), tol=1e-4):
        """Losses of `steps` and the final weights of run `name` against run `reference`."""
        run, _ = metrics(work(name))
        ref, _ = metrics(work(reference))
        diff = max(abs(run[s]["loss"] - ref[s]["loss"]) for s in steps)
        r.check(diff < tol, f"{what}: losses within {tol} of the {reference} run (max {diff:.2e})")
        diff = max_weight_diff(weights(work(name)), weights(work(reference)))
        r.check(diff < tol, f"{what}: final weights within {tol} (max {diff:.2e})")

    def compare_bitwise(name, reference, what):
        """Every step's loss and the final weights of run `name` bitwise those of run `reference`."""
        same = equal_steps(metrics(work(name))[0], metrics(work(reference))[0])
        r.check(len(same) == 20, f"{what}: bitwise the {reference} run's losses at all 20 steps (equal at {len(same)})")
        r.check(max_weight_diff(weights(work(name)), weights(work(reference))) == 0.0,
                f"{what}: and bitwise its final weights")

    def check_hf_export(name, architecture):
        """transformers loads run `name`'s Hugging Face export as `architecture`, with finite logits."""
        check = subprocess.run([sys.executable, "-c", (
            "import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "assert type(m).__name__ == sys.argv[2], type(m).__name__; "
            "print(m(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all().item())"),
            os.path.join(work(name), "export"), architecture], capture_output=True, text=True)
        r.check(check.returncode == 0 and check.stdout.strip().endswith("True"),
                f"{name}: transformers loads the export as {architecture} {check.stderr[-300:]}")

    def compare_to_straight(name, steps, what, tol=1e-4):
        compare_runs(name, "straight", what, steps, tol)

    def resume_elsewhere(name, source, extra, nproc, config=llama, reference="straight"):
        """Run `name` resumes run `source`'s step-10 checkpoint with other parallelism (`extra`,
        `nproc` ranks): steps 11..20 of the `reference` run."""
        os.makedirs(os.path.join(work(name), "checkpoint"))
        shutil.copytree(os.path.join(work(source), "checkpoint", "step-10"),
                        os.path.join(work(name), "checkpoint", "step-10"))
        out = r.run(name, args.trainer, nproc, config, extra)
        r.check("resumed from the checkpoint of step 10" in out, f"{name}: resumed from step 10")
        compare_runs(name, reference, f"{name}: steps 11..20", range(11, 21))

    if wanted("resume"):
        first = r.run("resume", args.trainer, 2, llama, ["--training.stop_at_step", "10"])
        r.check("training.stop_at_step reached" in first, "the first half stops at step 10")
        r.check(not os.path.exists(os.path.join(work("resume"), "export")), "no export before the last step")
        second = r.run("resume", args.trainer, 2, llama)
        r.check("resumed from the checkpoint of step 10" in second, "the second half resumes from step 10")
        r.check("was saved with another config (1 key(s) differ): training.stop_at_step: 10 -> -1" in second,
                "the resumed run names the one key it changed")
        r.check(any("loading the checkpoint:" in line and "(done)" in line for line in second.splitlines()),
                "a progress line for the checkpoint load")
        resumed, resumed_val = metrics(work("resume"))
        same = equal_steps(resumed, straight)
        r.check(len(same) == 20, f"bitwise equal losses at all 20 steps (equal at {len(same)})")
        r.check(resumed_val.get(20, {}).get("val/loss") == straight_val[20]["val/loss"], "equal validation loss")
        r.check(max_weight_diff(weights(work("resume")), straight_weights) == 0.0, "bitwise equal final weights")

    if wanted("sigterm"):
        first = r.run("sigterm", args.trainer, 2, llama, signal_after_step=3)
        stopped = [int(line.split("stopped after step ")[1].split()[0]) for line in first.splitlines()
                   if "signal received: stopped after step" in line]
        r.check(bool(stopped) and stopped[0] < 20, f"SIGTERM stops the run early with a checkpoint (after {stopped})")
        if stopped:
            r.check(os.path.isfile(os.path.join(work("sigterm"), "checkpoint", f"step-{stopped[0]}", "metadata.json")),
                    f"the checkpoint of step {stopped[0]} is complete")
        second = r.run("sigterm", args.trainer, 2, llama)
        resumed, _ = metrics(work("sigterm"))
        same = equal_steps(resumed, straight)
        r.check(len(same) == 20, f"after SIGTERM and resume: bitwise equal losses at all 20 steps (equal at {len(same)})")
        r.check(max_weight_diff(weights(work("sigterm")), straight_weights) == 0.0, "and bitwise equal final weights")

    if wanted("reshard"):
        r.run("reshard", args.trainer, 2, llama, ["--training.stop_at_step", "10"])
        out = r.run("reshard", args.trainer, 1, llama)
        r.check("resumed from the checkpoint of step 10" in out, "1 rank resumes the 2-rank checkpoint")
        compare_to_straight("reshard", range(11, 21), "steps 11..20 resumed on 1 rank")

    if wanted("tp"):
        r.run("tp", args.trainer, 4, llama,
              ["--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_sequence_parallel", "true",
               "--parallelism.enable_loss_parallel", "true", "--training.batch_size", "1"])
        compare_to_straight("tp", range(1, 21), "FSDP 2 x TP 2")

    if wanted("fused"):  # wq|wk|wv and w1|w3 as one GEMM each: the same training, the same parameter names
        r.run("fused", args.trainer, 2, llama, ["--model.fused_projections", "true"])
        compare_to_straight("fused", range(1, 21), "fused projections")
        # A checkpoint saved without the option resumes with it (the same parameter names).
        resume_elsewhere("fused_resume", "straight", ["--model.fused_projections", "true"], 2)

    if wanted("bf16"):
        r.run("bf16", args.trainer, 2, llama, ["--training.mixed_precision_param", "bfloat16"])
        compare_to_straight("bf16", range(1, 21), "bf16 compute", tol=2e-2)
        exported = weights(work("bf16"))
        r.check(all(t.dtype == torch.float32 for t in exported.values()), "bf16 compute keeps fp32 master weights")
        # One rank (2 micro-batches per step): FSDP only casts, and with fused_kernels = "cuda" it
        # keeps the bf16 copy that the optimizer writes instead.
        one = ["--training.mixed_precision_param", "bfloat16"]
        plain = r.run("bf16_one", args.trainer, 1, llama, one)
        r.check("writes the bf16 copy" not in plain, "1 rank bf16: FSDP casts (no copy kept by default)")
        if args.cuda_kernels:
            out = r.run("bf16_one_copy", args.trainer, 1, llama, [*one, "--training.fused_kernels", "cuda"])
            r.check("AdamW writes the bf16 copy of 5 one-rank FSDP unit(s)" in out,
                    "1 rank bf16 with fused_kernels = \"cuda\": the 4 blocks' and the root's units keep their copy")
            compare_bitwise("bf16_one_copy", "bf16_one", "1 rank bf16, copy kept and written by the optimizer")
        else:
            print("(this build has no titan::cuda_kernels: training.fused_kernels = \"cuda\" does not exist in it)")

    if wanted("deterministic"):
        out = r.run("deterministic", args.trainer, 2, llama, ["--training.deterministic", "true"])
        r.check("deterministic algorithms: on (an error for an operator without a deterministic kernel; "
                "CUBLAS_WORKSPACE_CONFIG :4096:8)" in out, "deterministic: the trainer says what it turned on")
        compare_bitwise("deterministic", "straight", "deterministic")

    if wanted("wsd"):
        r.run("wsd", args.trainer, 2, llama, ["--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_ratio", "0.25",
                                              "--lr_scheduler.decay_type", "sqrt"])
        run, _ = metrics(work("wsd"))
        base, floor = 8e-4, 0.1  # llama3_debug.toml: optimizer.lr, lr_scheduler.min_lr_ratio

        def factor(step):  # docs/training.md, LRSchedule: 2 warmup steps, 5 decay steps of 20
            if step <= 2:
                return step / 3
            return 1.0 if step <= 15 else floor + (1 - floor) * (1 - math.sqrt((step - 15) / 5))
        worst = max(abs(run[s]["lr"] / (base * factor(s)) - 1) for s in range(1, 21))
        r.check(worst < 1e-9, f"wsd: every step's lr is the warmup-stable-decay schedule's (worst relative {worst:.1e})")
        r.check(all(math.isfinite(run[s]["loss"]) for s in range(1, 21)), "wsd: finite losses")

    if wanted("hf_start"):
        out = r.run("hf_start", args.trainer, 2, llama,
                    ["--checkpoint.initial_load_path", os.path.join(work("straight"), "export"),
                     "--checkpoint.initial_load_in_hf", "true", "--optimizer.lr", "0", "--training.steps", "1",
                     "--data.val_freq", "0"])
        r.check("initial weights loaded from" in out, "started from the Hugging Face export")
        r.check(max_weight_diff(weights(work("hf_start")), straight_weights) == 0.0,
                "one step at lr 0 exports the loaded weights bitwise")
        start, _ = metrics(work("hf_start"))
        r.check(start[1]["loss"] < losses[0] - 0.5, f"its first loss {start[1]['loss']:.3f} is the trained model's "
                f"(a fresh model starts at {losses[0]:.3f})")

    if wanted("pp"):
        pp = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2"]
        out = r.run("pp", args.trainer, 4, llama, pp)
        r.check("pipeline: 2 ranks x 1 stage(s), schedule 1F1B, 2 micro-batches" in out, "pp: the pipeline is set up")
        compare_to_straight("pp", range(1, 21), "PP 2 x FSDP 2")
        _, pp_val = metrics(work("pp"))
        r.check(sorted(pp_val) == [10, 20] and all(abs(pp_val[s]["val/loss"] - straight_val[s]["val/loss"]) < 1e-4
                                                   for s in (10, 20)), "pp: validation losses of the straight run")
        # A pipeline checkpoint resumed without the pipeline, and a plain one resumed with it.
        for name, source, extra, nproc in (("pp_to_fsdp", "pp", [], 2), ("fsdp_to_pp", "straight", pp, 4)):
            resume_elsewhere(name, source, extra, nproc)
        # Each stage reads its tensors of a Hugging Face folder, and the stages export it back.
        out = r.run("pp_hf_start", args.trainer, 2, llama,
                    ["--parallelism.pipeline_parallel_degree", "2", "--checkpoint.initial_load_path",
                     os.path.join(work("straight"), "export"), "--checkpoint.initial_load_in_hf", "true",
                     "--optimizer.lr", "0", "--training.steps", "1", "--data.val_freq", "0"])
        r.check("initial weights loaded from" in out, "pp_hf_start: started from the Hugging Face export")
        r.check(max_weight_diff(weights(work("pp_hf_start")), straight_weights) == 0.0,
                "pp_hf_start: one step at lr 0 exports the loaded weights bitwise")

    if wanted("pp_schedules"):
        for name, extra in (("pp_interleaved", ["--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"]),
                            ("pp_zbh1", ["--parallelism.pipeline_parallel_schedule", "ZBH1",
                                         "--activation_checkpoint.mode", "none"])):
            out = r.run(name, args.trainer, 2, llama, ["--parallelism.pipeline_parallel_degree", "2", *extra])
            compare_to_straight(name, range(1, 21), name)

    cp = ["--parallelism.context_parallel_degree", "2"]
    if wanted("cp"):
        # 2 ranks of CP 2 are one data-parallel rank: the global batch of 4 in 2 micro-batches, and
        # the straight run's validation samples (2 ranks x 2 batches of 2) in 4 batches of 2.
        one_dp = [*cp, "--data.val_steps", "4"]
        for name, nproc, extra, what in (
                ("cp", 2, one_dp, "CP 2 (allgather)"),
                ("cp_p2p", 2, [*one_dp, "--parallelism.context_parallel_rotate_method", "p2p"], "CP 2 (p2p ring)"),
                ("cp_fsdp", 4, cp, "CP 2 x FSDP 2"),
                ("cp_tp", 4, [*cp, "--parallelism.tensor_parallel_degree", "2", "--training.batch_size", "1",
                              "--data.val_steps", "8"], "CP 2 x TP 2"),
                ("cp_pp", 4, [*one_dp, "--parallelism.pipeline_parallel_degree", "2"], "CP 2 x PP 2")):
            out = r.run(name, args.trainer, nproc, llama, extra)
            r.check(" cp=2 " in out, f"{name}: the mesh has cp=2")
            compare_to_straight(name, range(1, 21), what)
            _, val = metrics(work(name))
            r.check(sorted(val) == [10, 20] and all(abs(val[s]["val/loss"] - straight_val[s]["val/loss"]) < 1e-4
                                                    for s in (10, 20)), f"{name}: validation losses of the straight run")
        for name, source, extra, nproc in (("cp_to_fsdp", "cp_fsdp", [], 2), ("fsdp_to_cp", "straight", cp, 2)):
            resume_elsewhere(name, source, extra, nproc)

    if wanted("mistral_cp"):
        long = ["--training.seq_len", "256", "--data.val_freq", "0"]  # past Mistral's 128-token window
        r.run("mistral_long", args.trainer, 2, "mistral_debug.toml", long)
        r.run("mistral_cp", args.trainer, 2, "mistral_debug.toml",
              [*long, *cp, "--parallelism.context_parallel_rotate_method", "p2p"])
        compare_runs("mistral_cp", "mistral_long", "mistral_cp")

    if wanted("float8"):
        f8 = ["--float8.enable", "true"]
        if scaled_mm_is_reference_kernel():
            # oneDNN runs CPU float8 matmuls with its reference kernel on CPUs with AVX512-FP16/AMX
            # (seconds per GEMM: 40 s per debug step); emulated float8 keeps every comparison below.
            print("float8: this CPU's torch._scaled_mm is oneDNN's reference kernel: the runs emulate float8")
            f8 += ["--float8.emulate", "true"]
        gather = ["--float8.enable_fsdp_float8_all_gather", "true", "--float8.precompute_float8_dynamic_scale_for_fsdp",
                  "true"]
        # Float8 all-gather under FSDP changes no value: fp32 master weights cast with the global amax
        # are the float8 weights the plain float8 run casts after gathering fp32.
        out = r.run("float8_plain", args.trainer, 2, llama, f8)
        r.check("float8: 28 linear layers (tensorwise scaling" in out and "left in high precision: output" in out,
                "float8: the 28 block linear layers are converted, the output projection is not")
        r.run("float8_gather", args.trainer, 2, llama, [*f8, *gather])
        compare_bitwise("float8_gather", "float8_plain", "float8 FSDP all-gather")
        # Fused projections: wq, wk, wv (w1, w3) multiply one cast of x, each by its own float8
        # weight: the plain float8 run's values.
        r.run("float8_fused", args.trainer, 2, llama, [*f8, "--model.fused_projections", "true"])
        compare_bitwise("float8_fused", "float8_plain", "float8 with fused projections")
        # FSDP 2 x TP 2 (and the fused projections, colwise): amaxes reduced over the TP group, so
        # the same scales as FSDP 2.
        r.run("float8_tp", args.trainer, 4, llama,
              [*f8, *gather, "--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_sequence_parallel",
               "true", "--training.batch_size", "1", "--model.fused_projections", "true"])
        tp_run, _ = metrics(work("float8_tp"))
        gathered, _ = metrics(work("float8_gather"))
        diff = max(abs(tp_run[s]["loss"] - gathered[s]["loss"]) for s in range(1, 21))
        r.check(diff < FLOAT8_TP_TOL, f"float8 FSDP 2 x TP 2: losses within {FLOAT8_TP_TOL} of float8 FSDP 2 "
                f"(max {diff:.2e})")
        # 50 steps in bf16 compute: each float8 recipe tracks the bf16 run.
        fifty = ["--training.steps", "50", "--training.mixed_precision_param", "bfloat16", "--data.val_freq", "0",
                 "--checkpoint.interval", "50"]
        r.run("float8_bf16", args.trainer, 2, llama, fifty)
        bf16, _ = metrics(work("float8_bf16"))
        for name, extra in (("float8_bf16_tensorwise", [*f8, *gather]),
                            ("float8_bf16_rowwise", [*f8, "--float8.recipe_name", "rowwise"])):
            r.run(name, args.trainer, 2, llama, [*fifty, *extra])
            run, _ = metrics(work(name))
            diff = max(abs(run[s]["loss"] - bf16[s]["loss"]) for s in range(1, 51))
            r.check(diff < FLOAT8_TRACK_TOL, f"{name}: 50 losses within {FLOAT8_TRACK_TOL} of the bf16 run's "
                    f"(max {diff:.2e}; last {run[50]['loss']:.4f} vs {bf16[50]['loss']:.4f})")

    if wanted("no_labels"):
        out = r.run("no_labels", args.trainer, 2, "llama3_debug_alpaca.toml", ["--training.seq_len", "16", "--data.val_freq", "0"])
        skipped = sum("the global batch has no label tokens" in line for line in out.splitlines())
        r.check(skipped == 20 * 2, f"no_labels: all 20 steps skipped with a warning on each rank ({skipped} warnings)")
        r.check(os.path.isfile(os.path.join(work("no_labels"), "checkpoint", "step-20", "metadata.json"))
                and os.path.isfile(os.path.join(work("no_labels"), "export", "config.json")),
                "no_labels: the final checkpoint and the export are written")

    # The Alpaca prompt alone is ~50 tokens: longer rows, so that responses fit.
    if wanted("torchrun"):
        text = r.run("torchrun", args.trainer, 2, llama, torchrun=True)
        launched, _ = metrics(work("torchrun"))
        same = equal_steps(launched, straight)
        r.check(len(same) == 20, f"torchrun: bitwise equal losses at all 20 steps (equal at {len(same)})")
        # torchrun's agent serves the rendezvous store: rank 0 connects to it instead of trying to
        # serve the same port (which printed "failed to bind ... ignoring" on every launch).
        r.check("failed to bind" not in text, "torchrun: no store bind failure in the output")

    if wanted("restart"):
        text = r.run("restart", args.trainer, 2, llama, torchrun=True, max_restarts=1, kill_rank1_after_step=12)
        r.check("resumed from the checkpoint of step 10" in text, "restart: the restarted workers resume from step 10")
        restarted, _ = metrics(work("restart"))  # a step's last record wins: the restarted run's
        same = equal_steps(restarted, straight)
        r.check(len(same) == 20, f"restart: bitwise equal losses at all 20 steps (equal at {len(same)})")
        r.check(max_weight_diff(weights(work("restart")), straight_weights) == 0.0,
                "restart: bitwise equal final weights")

    if wanted("multinode"):
        hsdp = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
                "--training.batch_size", "1", "--checkpoint.enable", "false"]
        r.run("one_node", args.trainer, 4, llama, hsdp)
        one_node, _ = metrics(work("one_node"))
        for how in ("torchrun", "slurm"):
            r.run_nodes(f"two_nodes_{how}", args.trainer, llama, hsdp, how)
            nodes, _ = metrics(work(f"two_nodes_{how}"))
            same = equal_steps(nodes, one_node)
            r.check(len(same) == 20, f"multinode ({how}): bitwise the one-node HSDP losses at all 20 steps "
                    f"(equal at {len(same)})")

    if wanted("moe"):
        # The expert bias sums the token counts over the ranks: the 2-rank run's biases are the
        # 1-rank run's, and so are its routing decisions (up to rounding at a tie).
        r.run("moe_one", args.trainer, 1, "qwen3_moe_debug.toml", ["--parallelism.expert_parallel_degree", "1"])
        out = r.run("moe_ep", args.trainer, 2, "qwen3_moe_debug.toml")
        compare_runs("moe_ep", "moe_one", "moe: EP 2 on 2 ranks")
        # EP 2's checkpoint (experts sharded over ep, the expert bias) resumed at EP 1 on one rank
        # and at EP 4 on four.
        resume_elsewhere("moe_ep_to_one", "moe_ep", ["--parallelism.expert_parallel_degree", "1"], 1,
                         "qwen3_moe_debug.toml", "moe_ep")
        resume_elsewhere("moe_ep_to_four", "moe_ep", ["--parallelism.expert_parallel_degree", "4",
                                                      "--training.batch_size", "1"], 4, "qwen3_moe_debug.toml", "moe_ep")
        # PP 2 x EP 2 on 4 ranks (two layers per stage, each stage's experts shared by 2 ranks).
        r.run("moe_pp_ep", args.trainer, 4, "qwen3_moe_debug.toml", ["--parallelism.pipeline_parallel_degree", "2"])
        compare_runs("moe_pp_ep", "moe_one", "moe: PP 2 x EP 2 on 4 ranks")
        # EP borrowing the tensor-parallel ranks (sequence and loss parallel: each rank routes its
        # part of the sequence) and the context-parallel ranks (the experts' all-to-all is their
        # gradient reduction over cp), as torchtitan's ETP = 1.
        tp_ep_out = r.run("moe_tp_ep", args.trainer, 2, "qwen3_moe_debug.toml",
                    ["--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_sequence_parallel", "true",
                     "--parallelism.enable_loss_parallel", "true"])
        r.check("expert_parallel_degree 2 (ranks from tp 2, cp 1, dp_shard 1)" in tp_ep_out,
                "moe: the trainer names where the ep ranks come from")
        compare_runs("moe_tp_ep", "moe_one", "moe: TP 2 (sequence parallel) x EP 2 over the tp ranks")
        resume_elsewhere("moe_tp_ep_to_one", "moe_tp_ep", ["--parallelism.expert_parallel_degree", "1"], 1,
                         "qwen3_moe_debug.toml", "moe_tp_ep")
        r.run("moe_cp_ep", args.trainer, 2, "qwen3_moe_debug.toml", ["--parallelism.context_parallel_degree", "2"])
        compare_runs("moe_cp_ep", "moe_one", "moe: CP 2 x EP 2 over the cp ranks")
        # Each expert split over the tp pair (expert tensor parallel), alone on 2 ranks and with EP 2
        # over the data ranks on 4; the latter's checkpoint (experts sharded over ep and tp)
        # resumed on one rank.
        etp = ["--parallelism.tensor_parallel_degree", "2", "--parallelism.expert_tensor_parallel_degree", "2",
               "--parallelism.enable_sequence_parallel", "true"]
        etp_out = r.run("moe_etp", args.trainer, 2, "qwen3_moe_debug.toml",
                        [*etp, "--parallelism.expert_parallel_degree", "1"])
        r.check("each expert split over 2 tp ranks" in etp_out, "moe: the trainer logs expert tensor parallelism")
        compare_runs("moe_etp", "moe_one", "moe: TP 2 with each expert split over tp (ETP 2)")
        r.run("moe_etp_ep", args.trainer, 4, "qwen3_moe_debug.toml", etp)
        compare_runs("moe_etp_ep", "moe_one", "moe: TP 2 (ETP 2) x EP 2 over the data ranks on 4 ranks")
        resume_elsewhere("moe_etp_ep_to_one", "moe_etp_ep", ["--parallelism.expert_parallel_degree", "1"], 1,
                         "qwen3_moe_debug.toml", "moe_etp_ep")
        # ATen's deterministic algorithms (the dispatch's gradient sorts its indices on the CPU
        # too; uninitialized memory is NaN: the combine's slots must all be written).
        r.run("moe_deterministic", args.trainer, 1, "qwen3_moe_debug.toml",
              ["--parallelism.expert_parallel_degree", "1", "--training.deterministic", "true"])
        compare_bitwise("moe_deterministic", "moe_one", "moe: training.deterministic on 1 rank")
        ep, _ = metrics(work("moe_ep"))
        r.check("mixture of experts: expert_parallel_degree 2" in out and "experts (this step)" in out,
                "moe: the trainer logs the expert-parallel setup and the experts' loads")
        worst = [ep[s]["moe/max_over_mean_worst"] for s in range(1, 21)]
        r.check(all(1.0 <= w <= 8.0 for w in worst), f"moe: max/mean loads in [1, 8] at every step ({worst[0]:.2f} .. {worst[-1]:.2f})")
        out = r.run("mixtral", args.trainer, 2, "mixtral_debug.toml")
        run, _ = metrics(work("mixtral"))
        r.check(all(math.isfinite(run[s]["loss"]) and 0 < run[s]["moe/aux_loss"] < 16 for s in range(1, 21)),
                "mixtral: finite losses and a finite positive auxiliary loss at every step")
        check_hf_export("mixtral", "MixtralForCausalLM")

    if wanted("qwen3"):
        # Dense Qwen3 (q/k norms on head-sharded q and k): TP 2 with sequence parallel against one rank.
        r.run("qwen3_one", args.trainer, 1, "qwen3_debug.toml")
        r.run("qwen3_tp", args.trainer, 2, "qwen3_debug.toml",
              ["--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_sequence_parallel", "true"])
        compare_runs("qwen3_tp", "qwen3_one", "qwen3: TP 2 (sequence parallel) on 2 ranks")
        check_hf_export("qwen3_tp", "Qwen3ForCausalLM")
        # Qwen2.5 (q/k/v biases, sharded with their projections) with TP 2 and the projections
        # fused into one GEMM each (the biases added after it).
        qwen25 = ["--model.name", "qwen2.5", "--model.fused_projections", "true"]
        r.run("qwen25_one", args.trainer, 1, "qwen3_debug.toml", qwen25)
        r.run("qwen25_tp", args.trainer, 2, "qwen3_debug.toml", [*qwen25, "--parallelism.tensor_parallel_degree", "2"])
        compare_runs("qwen25_tp", "qwen25_one", "qwen2.5: TP 2 with fused projections on 2 ranks")
        check_hf_export("qwen25_tp", "Qwen2ForCausalLM")

    if wanted("doc_mask"):
        # Packed conversations (Qwen3 chat format, 128-token windows holding several) attending only
        # within themselves, under FSDP and under TP with sequence parallel, against one rank.
        chat = "qwen3_debug_chat.toml"
        window = ["--training.seq_len", "128"]
        r.run("doc_mask_one", args.trainer, 1, chat, window)
        r.run("doc_mask_fsdp", args.trainer, 2, chat, window)
        compare_runs("doc_mask_fsdp", "doc_mask_one", "doc_mask: FSDP 2, block-causal")
        r.run("doc_mask_tp", args.trainer, 2, chat,
              [*window, "--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_sequence_parallel", "true"])
        compare_runs("doc_mask_tp", "doc_mask_one", "doc_mask: TP 2 with sequence parallel, block-causal")
        r.run("doc_mask_pp", args.trainer, 2, chat,
              [*window, "--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"])
        compare_runs("doc_mask_pp", "doc_mask_one", "doc_mask: PP 2 (each stage reads its micro-batch's documents)")
        for method in ("allgather", "p2p"):
            r.run(f"doc_mask_cp_{method}", args.trainer, 2, chat,
                  [*window, "--parallelism.context_parallel_degree", "2",
                   "--parallelism.context_parallel_rotate_method", method])
            compare_runs(f"doc_mask_cp_{method}", "doc_mask_one",
                         f"doc_mask: CP 2 ({method}; the documents sharded as the tokens)")
        r.run("doc_mask_cp_pp", args.trainer, 4, chat,
              [*window, "--parallelism.context_parallel_degree", "2", "--parallelism.pipeline_parallel_degree", "2"])
        compare_runs("doc_mask_cp_pp", "doc_mask_one", "doc_mask: CP 2 x PP 2 on 4 ranks")
        r.run("doc_mask_causal", args.trainer, 1, chat, [*window, "--model.attn_mask_type", "causal"])
        run, _ = metrics(work("doc_mask_causal"))
        ref, _ = metrics(work("doc_mask_one"))
        diff = max(abs(run[s]["loss"] - ref[s]["loss"]) for s in range(1, 21))
        r.check(diff > 1e-3, f"doc_mask: the causal run's losses differ from the block-causal one's (max {diff:.2e})")

    if wanted("tied"):
        # Llama 3.2 (the output tied to the embedding: one weight, two uses, one gradient) under
        # FSDP 2 and under TP 2 (sequence and loss parallel: the tied output multiplies by the
        # embedding's vocabulary shard) against one rank; its export loads in transformers tied.
        r.run("tied_one", args.trainer, 1, llama, ["--model.name", "llama3.2"])
        r.run("tied_fsdp", args.trainer, 2, llama, ["--model.name", "llama3.2"])
        compare_runs("tied_fsdp", "tied_one", "tied: Llama 3.2 under FSDP 2")
        r.run("tied_tp", args.trainer, 2, llama,
              ["--model.name", "llama3.2", "--parallelism.tensor_parallel_degree", "2",
               "--parallelism.enable_sequence_parallel", "true", "--parallelism.enable_loss_parallel", "true"])
        compare_runs("tied_tp", "tied_one", "tied: Llama 3.2 under TP 2 with sequence and loss parallel")
        r.run("tied_tp_replicated", args.trainer, 2, llama,
              ["--model.name", "llama3.2", "--parallelism.tensor_parallel_degree", "2",
               "--parallelism.enable_loss_parallel", "true"])
        compare_runs("tied_tp_replicated", "tied_one", "tied: Llama 3.2 under TP 2 with loss parallel only")
        with open(os.path.join(work("tied_fsdp"), "export", "config.json")) as f:
            tied = json.load(f).get("tie_word_embeddings")
        r.check(tied is True and "lm_head.weight" not in weights(work("tied_fsdp")),
                "tied: the export says tie_word_embeddings and holds no lm_head.weight")
        check_hf_export("tied_fsdp", "LlamaForCausalLM")

    for name, trainer, config, extra in (("mistral", args.trainer, "mistral_debug.toml", []),
                                         ("alpaca", args.trainer, "llama3_debug_alpaca.toml",
                                          ["--training.seq_len", "128"]),
                                         ("chat", args.trainer, "qwen3_debug_chat.toml",
                                          ["--training.seq_len", "128"]),
                                         ("chat_llama2", args.trainer, "qwen3_debug_chat.toml",
                                          ["--training.seq_len", "128", "--model.name", "llama2",
                                           "--model.tokenizer_path",
                                           "data/cache/tokenizers/sentencepiece/spm_bpe_3k.model",
                                           "--model.tokenizer_kind", "sentencepiece",
                                           "--data.chat_format", "llama2"])):
        if not wanted(name):
            continue
        r.run(name, trainer, 2, config, extra)
        train, val = metrics(work(name))
        r.check(sorted(train) == list(range(1, 21)), f"{name}: logged steps 1..20")
        keys = {"loss", "perplexity", "lr", "grad_norm", "tokens_per_second_per_rank", "step_seconds",
                "data_seconds", "peak_memory_gib"}
        r.check(all(keys <= set(train[s]) for s in train), f"{name}: every record has {sorted(keys)}")
        r.check(all(math.isfinite(train[s]["loss"]) for s in train), f"{name}: finite losses")
        r.check(sorted(val) == [10, 20] and all(math.isfinite(v["val/loss"]) for v in val.values()),
                f"{name}: validation at steps 10 and 20")
        r.check(os.path.isfile(os.path.join(work(name), "export", "config.json")), f"{name}: Hugging Face export")

    if r.failures:
        print(f"{len(r.failures)} check(s) failed:\n  " + "\n  ".join(r.failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
