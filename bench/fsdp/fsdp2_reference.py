"""PyTorch FSDP2 (torch.distributed.fsdp.fully_shard) on the model of bench_fsdp.cpp, CPU / Gloo.

    .venv/bin/torchrun --standalone --nproc_per_node 4 bench/fsdp/fsdp2_reference.py [--dim 512 ...]

Prints one table row from rank 0: slowest rank's mean step time (ms), largest peak RSS (MiB) and
parameter + gradient + AdamW state per rank (MiB).
"""
import argparse
import os
import resource
import time

import torch
import torch.distributed as dist
from torch import nn


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(dim))
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x * self.norm)))


class Stack(nn.Module):
    def __init__(self, dim, hidden, depth):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def main():
    parser = argparse.ArgumentParser()
    for name, default in [("dim", 512), ("hidden", 2048), ("depth", 8), ("batch", 32), ("steps", 6), ("warmup", 2)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("dp_shard",))
    torch.manual_seed(0)
    model = Stack(args.dim, args.hidden, args.depth)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    x = torch.randn(args.batch // n, args.dim)
    y = torch.randn(args.batch // n, args.dim)
    total = 0.0
    for step in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if step >= args.warmup:
            total += (time.perf_counter() - start) * 1000
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    state_bytes = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    state_bytes += sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters())
    for state in optimizer.state.values():
        state_bytes += sum(local(v).numel() * local(v).element_size() for k, v in state.items() if k != "step")
    stats = torch.tensor([total / args.steps, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          state_bytes / 2**20], dtype=torch.double)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"| torch fsdp2  | {n} | {stats[0]:8.1f} | {stats[1]:9.0f} | {stats[2]:9.1f} |", flush=True)
    dist.barrier()  # no rank tears Gloo down while another still uses it (seen to abort otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
