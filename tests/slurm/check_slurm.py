"""The example trainer under a real Slurm cluster (scripts/slurm/cluster.sh: slurmctld and two
slurmd on this machine, nodes titan-node[1-2]), checked against the same job under titan_launch:

  srun      srun -N 2 -n 2 --kill-on-bad-exit=1 titan_train (rank 0's address from the compressed
            SLURM_JOB_NODELIST, no MASTER_ADDR): bitwise the titan_launch --nproc 2 losses, 20 steps
  sbatch    sbatch examples/slurm/multinode.sbatch on 2 nodes x 1 task (GPU lines overridden), a CPU
            config: the job succeeds, its output has the step lines, bitwise the same losses
  scancel   scancel --signal=TERM to the running batch job after step 3: the trainer saves a
            checkpoint at a step boundary and the job succeeds; the resubmitted job resumes from it
            and every step's loss equals the straight run's bitwise
  kill      rank 1 killed (SIGKILL) under srun --kill-on-bad-exit=1: srun ends non-zero within 30 s
  salloc    salloc -N 2 -n 4, then a step on the second node only (srun -N 1 -n 2 -w titan-node2):
            rank 0's host is the step's node (SLURM_STEP_NODELIST, not the job's first node),
            bitwise the same losses
  time      sbatch --time=1 --signal=TERM@20 (the time-limit warning, as multinode.sbatch's
            TERM@300): the trainer stops at a step boundary with a checkpoint before the limit, the
            job completes, and a resubmitted job resumes from it
  no srun   the trainer started by the batch script itself in a 2-task job: a clear error at once,
            not a rank 0 waiting for a rank nobody starts
  requeue   scontrol requeue of the running batch job (sbatch --requeue) after step 3: its tasks get
            TERM and the trainer saves at a step boundary; the requeued job (released at once:
            scontrol update StartTime=now) starts again, resumes, and every step's loss equals the
            straight run's
  uneven    srun -N 2 -n 3 (SLURM_TASKS_PER_NODE=2,1): each rank's node-local rank and count as
            Slurm placed them, bitwise the titan_launch --nproc 3 losses
Also prints Slurm's start-up time for a 2-task step on 2 nodes (srun -N 2 -n 2 true).

Exits 77 (ctest's skip code) when the cluster cannot start, naming why.
Usage: check_slurm.py --launch titan_launch --trainer titan_train --source SRC --workdir DIR
"""

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "trainer"))
from check_runs import free_port, kill_worker, metrics  # noqa: E402

SMALL = [
    "--training.seq_len", "32", "--training.batch_size", "2", "--training.global_batch_size", "4",
    "--training.steps", "20", "--lr_scheduler.warmup_steps", "4", "--metrics.log_freq", "1",
    "--metrics.enable_tensorboard", "false", "--checkpoint.enable", "true", "--checkpoint.interval", "10",
    "--data.val_freq", "0", "--training.mixed_precision_param", "float32",
]
CONFIG = "examples/configs/llama3_debug.toml"


def main():
    parser = argparse.ArgumentParser()
    for key in ("launch", "trainer", "source", "workdir"):
        parser.add_argument("--" + key, required=True)
    args = parser.parse_args()
    for key in ("launch", "trainer", "source", "workdir"):
        setattr(args, key, os.path.abspath(getattr(args, key)))
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    cluster = os.path.join(args.workdir, "cluster")
    script = os.path.join(args.source, "scripts", "slurm", "cluster.sh")
    start = subprocess.run([script, "start", cluster], capture_output=True, text=True)
    if start.returncode != 0:
        print(start.stderr.strip() or start.stdout.strip())
        return 77 if start.returncode == 77 else 1
    env = dict(os.environ, SLURM_CONF=os.path.join(cluster, "slurm.conf"), OMP_NUM_THREADS="1",
               TITAN_DEVICE="cpu", TITAN_BACKEND="gloo", TITAN_TRAIN=args.trainer)
    for key in ("MASTER_ADDR", "RANK", "WORLD_SIZE"):  # Slurm's variables only
        env.pop(key, None)
    failures = []

    def check(condition, message):
        print(("ok   " if condition else "FAIL ") + message, flush=True)
        if not condition:
            failures.append(message)

    def trainer_args(name, extra=()):
        return ["--config", CONFIG, "--job.dump_folder", os.path.join(args.workdir, name),
                "--data.cache_dir", os.path.join(args.workdir, "token_cache"), *SMALL, *extra]

    def losses(name):
        train, _ = metrics(os.path.join(args.workdir, name))
        return {step: record["loss"] for step, record in train.items()}

    def read_text(path):
        """A job's output file, or "" when the job never wrote it."""
        return open(path).read() if os.path.exists(path) else ""

    def stopped_steps(text):
        """The steps after which the trainer said it stopped on a signal."""
        return [int(line.split("stopped after step ")[1].split()[0]) for line in text.splitlines()
                if "signal received: stopped after step" in line]

    def wait_for_step(name, step, proc=None, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline and (proc is None or proc.poll() is None):
            try:
                if step in losses(name):
                    return True
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        return False

    def wait_for_job_to_leave(job_id, on_state=lambda state: None):
        """Polls squeue until job `job_id` has left it (at most ~60 s), handing `on_state` each state."""
        for _ in range(600):
            state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True,
                                   text=True).stdout.strip()
            if not state:
                return
            on_state(state)
            time.sleep(0.1)

    try:
        straight = subprocess.run([args.launch, "--nproc", "2", "--timeout", "300", "--", args.trainer,
                                   *trainer_args("straight")], cwd=args.source, env=env, capture_output=True,
                                  text=True)
        check(straight.returncode == 0, f"titan_launch --nproc 2 runs the job (exit {straight.returncode})")
        reference = losses("straight")

        port = ["--export=ALL,MASTER_PORT=" + str(free_port())]
        run = subprocess.run(["srun", "-N", "2", "-n", "2", "--kill-on-bad-exit=1", *port, args.trainer,
                              *trainer_args("srun")], cwd=args.source, env=env, capture_output=True, text=True,
                             timeout=300)
        check(run.returncode == 0, f"srun -N 2 -n 2: exit {run.returncode}" + (f" {run.stderr[-500:]}" if run.returncode else ""))
        check("2 ranks, gloo" in run.stdout + run.stderr, "srun: the ranks found each other through the node list")
        check(losses("srun") == reference, "srun: bitwise the titan_launch losses at all 20 steps")

        batch = ["sbatch", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                 "--export=ALL,MASTER_PORT=" + str(free_port())]

        def sbatch_trainer(flags, out, name, extra=()):
            """sbatch `flags` examples/slurm/multinode.sbatch on 2 nodes, the trainer as run `name`
            (`extra` arguments), its output in `out`."""
            return subprocess.run([*batch, *flags, "-o", out, "examples/slurm/multinode.sbatch", CONFIG,
                                   *trainer_args(name, extra)[2:]], cwd=args.source, env=env, capture_output=True,
                                  text=True, timeout=300)

        out = os.path.join(args.workdir, "sbatch.out")
        job = sbatch_trainer(["--wait"], out, "sbatch")
        text = read_text(out)
        check(job.returncode == 0, f"sbatch multinode.sbatch: exit {job.returncode}" + (f" {text[-500:]}" if job.returncode else ""))
        check("step     20 |" in text, "sbatch: its output has the step lines")
        check(losses("sbatch") == reference, "sbatch: bitwise the titan_launch losses at all 20 steps")

        # scancel --signal=TERM: the job's steps get SIGTERM, the trainer stops at a step boundary.
        out = os.path.join(args.workdir, "scancel.out")
        submitted = sbatch_trainer(["--parsable"], out, "scancel")
        job_id = submitted.stdout.strip().split(";")[0]
        check(wait_for_step("scancel", 3), "scancel: the batch job reached step 3")
        subprocess.run(["scancel", "--signal=TERM", job_id], env=env, check=False)
        wait_for_job_to_leave(job_id)
        stopped = stopped_steps(read_text(out))
        check(bool(stopped) and stopped[0] < 20, f"scancel --signal=TERM: the trainer stopped after step {stopped}")
        if stopped:
            check(os.path.isfile(os.path.join(args.workdir, "scancel", "checkpoint", f"step-{stopped[0]}",
                                              "metadata.json")), f"scancel: the checkpoint of step {stopped[0]}")
        again = sbatch_trainer(["--wait"], out + ".2", "scancel")
        check(again.returncode == 0 and "resumed from the checkpoint of step" in read_text(out + ".2"),
              "scancel: the resubmitted job resumes from the checkpoint")
        check(losses("scancel") == reference, "scancel: after TERM and resume, bitwise the straight losses")

        # salloc, then a step on some of the allocation's nodes.
        step = subprocess.run(["salloc", "-N", "2", "-n", "4", "srun", "-N", "1", "-n", "2", "-w", "titan-node2",
                               "--kill-on-bad-exit=1", args.trainer, *trainer_args("salloc")], cwd=args.source,
                              env=dict(env, MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300)
        check(step.returncode == 0, f"salloc + srun -w titan-node2: exit {step.returncode}" +
              (f" {step.stderr[-500:]}" if step.returncode else ""))
        check("launcher slurm, local rank 0 of 2 | rendezvous titan-node2:" in step.stdout + step.stderr,
              "salloc + srun -w titan-node2: rank 0's host is the step's node, not the job's first")
        check(losses("salloc") == reference, "salloc + srun: bitwise the titan_launch losses at all 20 steps")

        # The time limit's warning signal (--signal=TERM@20 on a one-minute job: Slurm sends it 10-40 s
        # in, as its time checks run every 30 s) reaches the trainer, which saves before the limit.
        name = "time"
        out = os.path.join(args.workdir, "time.out")
        started = time.time()
        job = sbatch_trainer(["--time=1", "--signal=TERM@20", "--wait"], out, name,
                             ["--training.steps", "100000", "--lr_scheduler.decay_type", "constant"])
        elapsed = time.time() - started
        stopped = stopped_steps(read_text(out))
        check(job.returncode == 0 and bool(stopped) and elapsed < 60,
              f"--time=1 --signal=TERM@20: the trainer stopped after step {stopped} and the job completed "
              f"(exit {job.returncode}) {elapsed:.0f} s in, before the limit")
        if stopped:
            check(os.path.isfile(os.path.join(args.workdir, name, "checkpoint", f"step-{stopped[0]}",
                                              "metadata.json")), f"time limit: the checkpoint of step {stopped[0]}")
            again = sbatch_trainer(["--wait"], out + ".2", name,
                                   ["--training.steps", str(stopped[0] + 2), "--lr_scheduler.decay_type", "constant"])
            check(again.returncode == 0 and f"resumed from the checkpoint of step {stopped[0]}" in read_text(out + ".2"),
                  "time limit: the resubmitted job resumes from that checkpoint")

        # The trainer run by the batch script itself, without srun.
        out = os.path.join(args.workdir, "nosrun.out")
        started = time.time()
        job = subprocess.run(["sbatch", "-N", "2", "-n", "2", "--wait", "-o", out, "--wrap",
                              shlex.join([args.trainer, *trainer_args("nosrun")])], cwd=args.source, env=env,
                             capture_output=True, text=True, timeout=300)
        text = read_text(out)
        check(job.returncode != 0 and "is not a task of a job step" in text and "srun" in text and
              time.time() - started < 30, f"no srun: the batch script's trainer fails at once naming srun "
              f"(exit {job.returncode}, {time.time() - started:.0f} s)" + ("" if "job step" in text else f" {text[-300:]}"))

        # scontrol requeue (preemption, a failed node): the job runs again and resumes.
        out = os.path.join(args.workdir, "requeue.out")
        submitted = sbatch_trainer(["--requeue", "--open-mode=append", "--parsable"], out, "requeue")
        job_id = submitted.stdout.strip().split(";")[0]
        check(wait_for_step("requeue", 3), "requeue: the batch job reached step 3")
        subprocess.run(["scontrol", "requeue", job_id], env=env, check=False)
        released = []

        def release(state):  # Slurm holds a requeued job back ~2 minutes
            if state == "PENDING" and not any(released):
                released.append(subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env,
                                               capture_output=True).returncode == 0)

        wait_for_job_to_leave(job_id, release)
        check(any(released) and "resumed from the checkpoint of step" in read_text(out),
              "requeue: the requeued job started again and resumed from a checkpoint")
        check(losses("requeue") == reference, "requeue: after the requeue, bitwise the straight losses at all 20 steps")

        # Uneven tasks per node: 2 on the first node, 1 on the second.
        three = ["--training.global_batch_size", "6", "--training.steps", "6"]
        straight3 = subprocess.run([args.launch, "--nproc", "3", "--timeout", "300", "--", args.trainer,
                                    *trainer_args("straight3", three)], cwd=args.source, env=env, capture_output=True,
                                   text=True)
        check(straight3.returncode == 0, f"titan_launch --nproc 3 runs the job (exit {straight3.returncode})")
        uneven = subprocess.run(["srun", "-N", "2", "-n", "3", "--kill-on-bad-exit=1", args.trainer,
                                 *trainer_args("uneven", three)], cwd=args.source, timeout=300,
                                env=dict(env, MASTER_PORT=str(free_port()), TITAN_LOG_ALL_RANKS="1"),
                                capture_output=True, text=True)
        placed = sorted(line.split("] ")[0].split()[-1] + " " + line.split("launcher slurm, ")[1].split(" |")[0]
                        for line in (uneven.stdout + uneven.stderr).splitlines() if "launcher slurm, local rank" in line)
        check(uneven.returncode == 0 and placed == ["0/3 local rank 0 of 2", "1/3 local rank 1 of 2",
                                                    "2/3 local rank 0 of 1"],
              f"srun -N 2 -n 3: ranks placed 2 + 1 as Slurm placed them ({placed}, exit {uneven.returncode})")
        check(losses("uneven") == losses("straight3"), "srun -N 2 -n 3: bitwise the titan_launch --nproc 3 losses")
        started = time.time()
        subprocess.run(["srun", "-N", "2", "-n", "2", "true"], env=env, check=False, timeout=60)
        print(f"info Slurm's start-up of a 2-task step on 2 nodes (srun -N 2 -n 2 true): {time.time() - started:.2f} s")

        # A rank that dies ends the job.
        name = "kill"
        proc = subprocess.Popen(["srun", "-N", "2", "-n", "2", "--kill-on-bad-exit=1",
                                 "--export=ALL,MASTER_PORT=" + str(free_port()), args.trainer,
                                 *trainer_args(name, ["--training.steps", "100000"])], cwd=args.source, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reached = wait_for_step(name, 3, proc)
        check(reached, "kill: the job reached step 3")
        if reached:
            kill_worker(os.path.join(args.workdir, name), 1, "SLURM_PROCID")
        killed = time.time()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            code = None
        check(code not in (None, 0) and time.time() - killed < 30,
              f"kill: srun --kill-on-bad-exit=1 ends the job (exit {code}) {time.time() - killed:.1f} s after rank 1 died")
    finally:
        subprocess.run([script, "stop", cluster], env=env, check=False)
    if failures:
        print(f"{len(failures)} check(s) failed:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
