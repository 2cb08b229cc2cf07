"""The PyTorch side of bench/side_by_side: one Llama 3 training run, one JSON line from rank 0.

    torchrun --standalone --nproc_per_node N bench/side_by_side/reference.py --impl fsdp2 [shape...]

Implementations (same shape, batch, optimizer and activation checkpointing as titan's row):
  fsdp2          a plain PyTorch Llama 3 (below), fully_shard per block and root, eager
  fsdp2_compile  the same with torch.compile on each block (as torchtitan compiles)
  torchtitan     torchtitan's own Llama 3 model, parallelize_llama (AC, compile, FSDP exactly as
                 torchtitan applies them), optimizer container, loss and gradient clipping, in
                 torchtitan's train_step order. Its dataloader, metrics and checkpointer are not in
                 the loop; batches are uniform random tokens, as for the other rows.
  torchtitan_compile  the same with torchtitan's [compile] enable = true (model and loss)
  torchtitan_moe      torchtitan's own Qwen3 mixture-of-experts model (--moe-experts > 0: every
                 block's feed-forward routed top-k, q/k norms), parallelize_qwen3 (expert
                 parallelism over --ep of the data-parallel ranks, AC, FSDP), the optimizers with
                 its expert-bias update, in the same train_step order. Experts through
                 torch._grouped_mm (torchtitan's default, in bf16); torchtitan_moe_compile adds
                 its [compile] enable = true; torchtitan_moe_loop runs the experts as its
                 per-expert loop. On the CPU, torchtitan's token permutation takes its own
                 CPU implementation (generate_permute_indices(use_cpu=True)) instead of Triton's,
                 and its router's torch.histc over expert indices (integer histc is CUDA-only)
                 becomes torch.bincount.

Timing: `--warmup` steps, then `--steps` steps between two device synchronisations; tokens/s per
rank = local tokens per step / mean step time (slowest rank). Peak memory: the CUDA caching
allocator's peak active and reserved bytes after warm-up, or on the CPU the resident-set
high-water mark after warm-up (VmHWM reset through /proc/self/clear_refs, as titan's trainer does).
"""
import argparse
import contextlib
import json
import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# torchtitan's per-operator save list (torchtitan/models/llama3/infra/parallelize.py): the matmuls
# (every other one is recomputed), the attention kernels and the reduce-scatter.
SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten.max.default,
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["fsdp2", "fsdp2_compile", "torchtitan", "torchtitan_compile", "torchtitan_moe",
                                      "torchtitan_moe_compile", "torchtitan_moe_loop"], required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=0, help="torchtitan_moe rows: 0 is dim / n_heads")
    p.add_argument("--multiple-of", type=int, default=64)
    p.add_argument("--ffn-dim-multiplier", type=float, default=None)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--local-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="FSDP param_dtype")
    p.add_argument("--ac", default="2", help="'op' (per-operator), 'N' (every N-th block), 'full' or 'none'")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--moe-experts", type=int, default=0, help="experts per block (torchtitan_moe rows)")
    p.add_argument("--moe-top-k", type=int, default=2)
    p.add_argument("--moe-hidden", type=int, default=64, help="each expert's hidden width")
    p.add_argument("--load-balance-coeff", type=float, default=1e-3, help="expert-bias rate (0: none)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree")
    return p.parse_args()


# ---- the plain PyTorch Llama 3 of the fsdp2 rows (same architecture as titan's examples/models/llama)


def hidden_dim(a):
    hidden = int(2 * 4 * a.dim / 3)
    if a.ffn_dim_multiplier:
        hidden = int(a.ffn_dim_multiplier * hidden)
    return a.multiple_of * ((hidden + a.multiple_of - 1) // a.multiple_of)


def rope_tables(a):
    head = a.dim // a.n_heads
    freqs = 1.0 / (a.rope_theta ** (torch.arange(0, head, 2).float() / head))
    angles = torch.outer(torch.arange(a.seq_len).float(), freqs)  # [T, head/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    # x: [B, T, H, D] viewed as pairs (D/2, 2); cos, sin: [T, D/2]
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_heads, self.n_kv, self.head = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.n_heads * self.head, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head, a.dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape  # x: [B, T, dim]
        q = apply_rope(self.wq(x).view(b, t, self.n_heads, self.head), cos, sin)  # [B, T, H, D]
        k = apply_rope(self.wk(x).view(b, t, self.n_kv, self.head), cos, sin)  # [B, T, KV, D]
        v = self.wv(x).view(b, t, self.n_kv, self.head)  # [B, T, KV, D]
        rep = self.n_heads // self.n_kv
        k = k.repeat_interleave(rep, dim=2)  # [B, T, H, D]
        v = v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))  # [B, T, dim]


class FeedForward(nn.Module):
    def __init__(self, a):
        super().__init__()
        h = hidden_dim(a)
        self.w1 = nn.Linear(a.dim, h, bias=False)
        self.w2 = nn.Linear(h, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, h, bias=False)

    def forward(self, x):  # x: [B, T, dim]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.attention_norm = nn.RMSNorm(a.dim, eps=1e-5)
        self.attention = Attention(a)
        self.ffn_norm = nn.RMSNorm(a.dim, eps=1e-5)
        self.feed_forward = FeedForward(a)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleDict({str(i): Block(a) for i in range(a.n_layers)})
        self.norm = nn.RMSNorm(a.dim, eps=1e-5)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        cos, sin = rope_tables(a)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens):  # tokens: [B, T]
        h = self.tok_embeddings(tokens)  # [B, T, dim]
        for layer in self.layers.values():
            h = layer(h, self.cos, self.sin)
        return self.output(self.norm(h))  # [B, T, vocab]


def op_sac_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    counts = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        if func == torch.ops.aten.mm.default:
            counts["forward" if not ctx.is_recompute else "recompute"] += 1
            # torchtitan keeps every other matmul: the odd ones of each pass
            if counts["forward" if not ctx.is_recompute else "recompute"] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_block_ac(model, a):
    """Wraps the blocks of the plain Llama for activation checkpointing as `a.ac` says (and
    compiles each for fsdp2_compile), as torchtitan's apply_ac does."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.layers.items()):
        index = int(name)
        if a.ac == "full" or (a.ac.isdigit() and index % int(a.ac) == 0):
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        elif a.ac == "op":
            block = checkpoint_wrapper(block, context_fn=op_sac_context, preserve_rng_state=False)
        if a.impl == "fsdp2_compile":
            block = torch.compile(block, fullgraph=True)
        model.layers[name] = block


def build_fsdp2(a, mesh, device):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.device("meta"):
        model = Llama(a)
    apply_block_ac(model, a)
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, a.dtype), reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    model.to_empty(device=device)
    with torch.no_grad():
        torch.manual_seed(a.seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        cos, sin = rope_tables(a)
        model.cos.copy_(cos)
        model.sin.copy_(sin)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=fused, foreach=not fused)

    def loss_fn(logits, labels):  # logits: [B, T, vocab]; labels: [B, T]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))

    def clip():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)

    return model, opt, loss_fn, clip, contextlib.nullcontext


def torchtitan_qwen3_moe(a):
    """torchtitan's Qwen3 mixture-of-experts model at this run's shape, and its parallelize function."""
    from torchtitan.models.moe import MoEArgs
    from torchtitan.models.qwen3 import Qwen3Model, Qwen3ModelArgs, parallelize_qwen3

    moe = MoEArgs(num_experts=a.moe_experts, num_shared_experts=0, score_func="softmax", route_norm=True,
                  score_before_experts=False, top_k=a.moe_top_k, use_grouped_mm=a.impl != "torchtitan_moe_loop",
                  load_balance_coeff=a.load_balance_coeff or None)
    args = Qwen3ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                          head_dim=a.head_dim or a.dim // a.n_heads, vocab_size=a.vocab_size, qk_norm=True,
                          rope_theta=1e6, max_seq_len=a.seq_len, moe_enabled=True, moe_inter_dim=a.moe_hidden,
                          moe_args=moe)
    with torch.device("meta"):
        return Qwen3Model(args), parallelize_qwen3


def torchtitan_model(a, world, optimizer_implementation):
    """torchtitan's job config for this run, its ParallelDims (mesh built) and its model built on
    the meta device and parallelized by torchtitan (AC, compile, expert parallelism, FSDP): Llama 3
    through parallelize_llama, or Qwen3-MoE through parallelize_qwen3 for the torchtitan_moe rows."""
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs, parallelize_llama

    job = JobConfig()
    job.training.local_batch_size = a.local_batch
    job.training.global_batch_size = a.global_batch
    job.training.seq_len = a.seq_len
    job.training.mixed_precision_param = a.dtype
    job.training.max_norm = 1.0
    job.activation_checkpoint.mode = {"full": "full", "none": "none"}.get(a.ac, "selective")
    job.activation_checkpoint.selective_ac_option = a.ac
    job.compile.enable = a.impl in ("torchtitan_compile", "torchtitan_moe_compile")
    job.optimizer.lr = 8e-4
    job.optimizer.eps = 1e-8
    job.optimizer.weight_decay = 0.1
    job.optimizer.implementation = optimizer_implementation
    job.job.dump_folder = "/tmp/titan_side_by_side_torchtitan"
    ep = getattr(a, "ep", 1)  # bench/gpu_cost's trace_peers.py passes no MoE arguments
    job.parallelism.expert_parallel_degree = ep
    parallel_dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=ep, etp=1, world_size=world)
    parallel_dims.build_mesh()
    if a.impl.startswith("torchtitan_moe"):
        model, parallelize = torchtitan_qwen3_moe(a)
        return job, parallel_dims, parallelize(model, parallel_dims, job)
    args = TransformerModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                                vocab_size=a.vocab_size, multiple_of=a.multiple_of,
                                ffn_dim_multiplier=a.ffn_dim_multiplier, rope_theta=a.rope_theta, max_seq_len=a.seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    return job, parallel_dims, parallelize_llama(model, parallel_dims, job)


def build_torchtitan(a, world, device):
    if device.type == "cpu":  # torchtitan picks "cuda" when no accelerator is visible: make it pick the CPU
        torch._utils._get_available_device_type = lambda: "cpu"
        import torchtitan.models.moe.utils as moe_utils  # Triton's token permutation -> torchtitan's CPU one

        triton_permute = moe_utils.generate_permute_indices
        moe_utils.generate_permute_indices = lambda *args, **kwargs: triton_permute(*args, **kwargs, use_cpu=True)
        histc = torch.histc  # the router counts tokens per expert with histc on integers: CUDA only

        def integer_histc(x, bins=100, min=0, max=0):
            if x.is_floating_point() or x.device.type != "cpu":
                return histc(x, bins=bins, min=min, max=max)
            return torch.bincount(x - min, minlength=bins)[:bins].to(x.dtype)  # min <= x < max, as the router's

        torch.histc = integer_histc
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.components.optimizer import build_optimizers, build_optimizers_with_moe_load_balancing
    from torchtitan.distributed import utils as dist_utils

    job, parallel_dims, model = torchtitan_model(a, world, "fused" if device.type == "cuda" else "foreach")
    if device.type == "cpu":  # torchtitan reduces gradients with NCCL's PreMulSum, which Gloo lacks: average
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(float(world))
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    build = build_optimizers_with_moe_load_balancing if a.impl.startswith("torchtitan_moe") else build_optimizers
    optimizers = build([model], job.optimizer, parallel_dims)
    sum_loss = build_cross_entropy_loss(job)
    amp = dist_utils.maybe_enable_amp(parallel_dims, a.dtype, device.type)

    def loss_fn(logits, labels):  # torchtitan's: the sum over the tokens over the global token count
        return sum_loss(logits, labels) / (labels.numel() * (world if device.type == "cuda" else 1))

    def clip():
        dist_utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True, ep_enabled=parallel_dims.ep_enabled)

    return model, optimizers, loss_fn, clip, lambda: amp


def main():
    a = parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl" if world == 1 or torch.cuda.device_count() >= world else "gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    from torch.distributed.device_mesh import init_device_mesh

    accumulation = a.global_batch // (a.local_batch * world)
    assert accumulation * a.local_batch * world == a.global_batch, "global batch = local batch x ranks x accumulation"
    if a.impl.startswith("torchtitan"):
        model, opt, loss_fn, clip, amp = build_torchtitan(a, world, device)
    else:
        mesh = init_device_mesh(device.type, (world,))
        model, opt, loss_fn, clip, amp = build_fsdp2(a, mesh, device)

    gen = torch.Generator().manual_seed(a.seed + rank)
    batches = [torch.randint(0, a.vocab_size, (a.local_batch, a.seq_len + 1), generator=gen) for _ in range(4)]

    def step(i):
        opt.zero_grad()
        for m in range(accumulation):
            tokens = batches[(i * accumulation + m) % len(batches)].to(device, non_blocking=True)
            with amp():
                logits = model(tokens[:, :-1])  # [B, T, vocab]
                loss = loss_fn(logits, tokens[:, 1:]) / accumulation
            del logits
            loss.backward()
        clip()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    for i in range(a.warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # as titan's trainer does: reset the resident-set high-water mark (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    start = time.perf_counter()
    for i in range(a.steps):
        step(a.warmup + i)
    sync()
    seconds = torch.tensor([(time.perf_counter() - start) / a.steps], dtype=torch.float64)
    if device.type == "cuda":
        stats = torch.cuda.memory_stats()
        memory = torch.tensor([stats["active_bytes.all.peak"] / 2**30, stats["reserved_bytes.all.peak"] / 2**30],
                              dtype=torch.float64)
    else:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB -> GiB
        memory = torch.tensor([hwm, hwm], dtype=torch.float64)
    if backend == "nccl":
        seconds, memory = seconds.to(device), memory.to(device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    tokens_per_step = a.local_batch * a.seq_len * accumulation
    tps = tokens_per_step / seconds.item()
    if rank == 0:
        print(json.dumps({"impl": a.impl, "ranks": world, "device": device.type, "step_ms": seconds.item() * 1e3,
                          "tokens_per_s_per_rank": tps,
                          "peak_active_gib": memory[0].item(), "peak_reserved_gib": memory[1].item()}), flush=True)
    dist.destroy_process_group()
    sys.stdout.flush()
    # The row is out: skip interpreter teardown, where a rank of the torchtitan rows sometimes
    # aborts on CPU ("terminate called without an active exception") after its work is done.
    os._exit(0)


if __name__ == "__main__":
    main()
