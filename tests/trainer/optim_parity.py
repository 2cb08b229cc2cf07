#!/usr/bin/env python3
"""Parity of examples/common's optimizer pieces with PyTorch.

Trains a tiny MLP (Linear -> LayerNorm -> tanh -> Linear, cross-entropy) for a few steps with
torch.optim.AdamW (weights decayed; biases and norm parameters not), a linear-warmup + cosine LR
schedule (LambdaLR) and torch.nn.utils.clip_grad_norm_, writes the initial weights, the batches
and what PyTorch computed (loss, lr and grad norm per step, final weights) to reference.json,
then runs the C++ test case that repeats the run with make_adamw / LRSchedule / clip_grad_norm
and compares (losses and final weights to 1e-6 in fp32).
"""
import argparse
import json
import math
import os
import subprocess
import sys

import torch

CASE = "optim: parity with PyTorch*"  # doctest filters split at commas: a prefix

CONFIG = dict(in_=6, hidden=16, out=5, batch=8, steps=6, lr=2e-2, beta1=0.9, beta2=0.95, eps=1e-8,
              weight_decay=0.1, warmup_steps=2, decay_type="cosine", min_lr_ratio=0.1, max_norm=0.5)


def lr_factor(step, warmup, total, min_ratio):
    """The documented schedule (examples/common/optim.hpp), step counted from 1."""
    if step <= warmup:
        return step / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TinyMLP(torch.nn.Module):
    def __init__(self, n_in, hidden, n_out):
        super().__init__()
        self.fc1 = torch.nn.Linear(n_in, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def dump(t):
    return {"shape": list(t.shape), "data": [float(v) for v in t.detach().reshape(-1).tolist()]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--exe", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    c = CONFIG
    model = TinyMLP(c["in_"], c["hidden"], c["out"])
    with torch.no_grad():  # non-trivial norm parameters, so their group matters
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.2, 0.2)
    initial = {name: dump(p) for name, p in model.named_parameters()}
    batches = [{"x": torch.randn(c["batch"], c["in_"]) * 2, "y": torch.randint(0, c["out"], (c["batch"],))}
               for _ in range(c["steps"])]

    decay = [model.fc1.weight, model.fc2.weight]
    no_decay = [model.fc1.bias, model.norm.weight, model.norm.bias, model.fc2.bias]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i + 1, c["warmup_steps"], c["steps"], c["min_lr_ratio"]))
    losses, lrs, norms = [], [], []
    for batch in batches:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), c["max_norm"])))
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    # The run must exercise clipping, else the comparison would not test it.
    assert any(n > c["max_norm"] for n in norms), norms

    reference = {
        "config": {"in": c["in_"], **{k: v for k, v in c.items() if k != "in_"}},
        "initial": initial,
        "batches": [{"x": dump(b["x"]), "y": dump(b["y"].double())} for b in batches],
        "losses": losses, "lrs": lrs, "grad_norms": norms,
        "final": {name: dump(p) for name, p in model.named_parameters()},
    }
    path = os.path.join(args.workdir, "reference.json")
    with open(path, "w") as f:
        json.dump(reference, f)
    print(f"PyTorch: losses {losses}\n         lrs {lrs}\n         grad norms {norms}", flush=True)

    env = dict(os.environ, TITAN_TRAINER_PARITY=path, OMP_NUM_THREADS="1")
    run = subprocess.run([args.exe, f"--test-case={CASE}", "--no-skip"], env=env, capture_output=True, text=True)
    sys.stdout.write(run.stdout + run.stderr)
    if run.returncode != 0:
        return run.returncode
    if "1 passed" not in run.stdout:
        print("optim_parity.py: the C++ parity case did not run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
