"""PyTorch DCP on the state of bench_checkpoint.cpp: one JSON line with save, async save and load.

    .venv/bin/python bench/checkpoint/dcp_reference.py --params 1000000000 --dir DIR
    torchrun --standalone --nproc_per_node 2 bench/checkpoint/dcp_reference.py ...   (row-sharded)

The state is on TITAN_DEVICE (cpu, or cuda: each rank's GPU), as bench_checkpoint's is. It is `params` fp32 values in [4096, 4096] tensors (each rank holds its rows of every tensor,
as DTensors sharded on dim 0 when there are several ranks), the same as bench_checkpoint. A save
counts until its files are durable (`os.sync()` after `dcp.save`, as titan fsyncs its files); the
async save's blocked time is until `dcp.async_save` returns, its total until the future is done and
synced; while it writes, the same training steps as bench_checkpoint's run (8 matmul + tanh from a
fixed input, [512, 512] on the CPU, [4096, 4096] on a GPU), and their extra time over the baseline
step is the background write's stall. The load goes into fresh zero tensors from the disk (the files are dropped from the page cache
first, as bench_checkpoint does) and is checked for equality.
"""
import argparse
import json
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

ROWS = COLS = 4096


def train_step(a, b):
    """bench_checkpoint's stand-in training step (its train_step): seconds, finished on the device."""
    start = time.perf_counter()
    x = b
    for _ in range(8):
        x = torch.tanh(a @ x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=1_000_000_000)
    p.add_argument("--dir", default="/tmp/titan_bench_checkpoint_dcp")
    a = p.parse_args()
    torch.set_num_threads(1)
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    device = os.environ.get("TITAN_DEVICE", "cpu")  # as bench_checkpoint: cpu, or cuda (this rank's GPU)
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if ranks > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if ranks > 1 else 0
    count = max(1, a.params // (ROWS * COLS))
    torch.manual_seed(0)

    mesh = None
    if ranks > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh(device.split(":")[0], (ranks,))

    def make(fill):
        state = {}
        for i in range(count):
            shape = (ROWS // ranks, COLS)
            local = torch.randn(shape, device=device) if fill else torch.zeros(shape, device=device)  # [rows/ranks, cols]
            if mesh is not None:
                local = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
            state[f"layers.{i}.weight"] = local
        return state

    def barrier():
        if ranks > 1:
            dist.barrier()

    state = make(True)
    work = 4096 if device.startswith("cuda") else 512
    a_step = torch.randn(work, work, device=device) / (work ** 0.5 * 1.5)
    b_step = torch.randn(work, work, device=device)
    gb = count * ROWS * COLS * 4 / 1e9
    result = {"impl": "dcp", "ranks": ranks, "gb": gb}
    for mode in ("sync", "async"):
        folder = os.path.join(a.dir, mode)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        barrier()
        start = time.perf_counter()
        if mode == "sync":
            dcp.save(state, checkpoint_id=folder)
            blocked = time.perf_counter() - start
        else:
            for _ in range(5):  # warm-up: the first calls of a Python process run slower
                train_step(a_step, b_step)
            baseline = sum(train_step(a_step, b_step) for _ in range(20)) / 20  # right before, as bench_checkpoint
            barrier()
            start = time.perf_counter()
            future = dcp.async_save(state, checkpoint_id=folder)
            blocked = time.perf_counter() - start
            steps, overlapped = 0, 0.0  # training while the background write goes on
            while not future.done():
                overlapped += train_step(a_step, b_step)
                steps += 1
            future.result()
            result["async_overlapped_s"] = overlapped
            result["async_slowdown_s"] = overlapped - steps * baseline
        os.sync()
        barrier()
        result[f"save_{mode}_blocked_s"] = blocked
        result[f"save_{mode}_s"] = time.perf_counter() - start
    if rank == 0:  # load from the disk, as bench_checkpoint does: the files leave the page cache
        for folder, _, files in os.walk(os.path.join(a.dir, "sync")):
            for name in files:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
    target = make(False)
    barrier()
    start = time.perf_counter()
    dcp.load(target, checkpoint_id=os.path.join(a.dir, "sync"))
    barrier()
    result["load_s"] = time.perf_counter() - start
    for name, tensor in state.items():
        got = target[name].to_local() if ranks > 1 else target[name]
        want = tensor.to_local() if ranks > 1 else tensor
        assert torch.equal(got, want), f"dcp_reference: {name} differs after the load"
    if rank == 0:
        shutil.rmtree(a.dir, ignore_errors=True)
        print(json.dumps(result), flush=True)
    if ranks > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
