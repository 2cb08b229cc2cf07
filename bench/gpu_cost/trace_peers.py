"""Traces one training step of a Python peer at a GPU shape without computing it, for the GPU cost
model (cost_model.py): the same lines bench_gpu_cost_trace writes for titan.

    python bench/gpu_cost/trace_peers.py --impl torchtitan --out torchtitan.jsonl [shape...]

Peers (those of bench/side_by_side/reference.py, with its shape flags):
  fsdp2       the plain PyTorch Llama 3 of reference.py, its per-operator AC, bf16 parameters with fp32
              reduction under FSDP2 on one GPU
  torchtitan  torchtitan 0.2.2's Llama 3 and its parallelize_llama (AC as configured; on one GPU
              torchtitan applies no FSDP and trains under autocast to bf16)
  torchtitan_moe  torchtitan's Qwen3-MoE (--moe-experts > 0) through parallelize_qwen3, as
              bench/side_by_side runs it: grouped GEMMs, the expert bias updated by torchtitan's
              own optimizer pre-step hook

The model runs on the meta device under a TorchDispatchMode that writes one line per operator call
below autograd (what runs as a kernel; per-operator AC's cached outputs run none and are not seen).
What cannot run on meta tensors as it does on the GPU is reproduced here:
  - CUDA's kernel choices: SDPA's cuDNN backend and the fused RMSNorm kernel (registered below,
    the same choices bench_gpu_cost_trace makes for titan);
  - autocast to bf16 (torchtitan on one GPU): meta tensors carry no autocast key, so CUDA
    autocast's rule is applied to the calls of this model that it changes: F.linear and SDPA take
    bf16 copies of fp32 tensors (parameters' copies cached within a region, as autocast does); the
    loss casts to fp32 itself, and RMSNorm is on no autocast list;
  - torchtitan's Triton kernel of the MoE token permutation (fill_indices_on_meta);
  - gradient clipping with foreach kernels (meta tensors refuse foreach=True): _foreach_norm, the
    norm of norms, _foreach_mul_, as CUDA runs clip_grad_norm_;
  - FSDP2 on one rank (fsdp2): FSDP2 refuses meta parameters, so its per-unit work is issued as
    FSDP2 (torch 2.11) issues it on one rank: per all-gather a cast of each fp32 shard to bf16, one
    _foreach_copy_ into the all-gather buffer, the (in-place) all-gather and one
    split_with_sizes_copy out; per reduce-scatter one _chunk_cat of the bf16 gradients into an fp32
    buffer and the (copying) reduce-scatter; blocks gathered twice (reshard after forward), the
    root once; block inputs cast to bf16 (cast_forward_inputs).
The optimizer is torch.optim.AdamW(fused=True)'s step: _foreach_add_ of the step counts, then one
_fused_adamw_ (meta parameters cannot build the fused optimizer itself).
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/side_by_side"))

def register_cuda_choices():
    """Kernels that make CUDA's kernel choices on meta tensors (see the module docstring)."""
    warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
    lib = torch.library.Library("aten", "IMPL")

    def sdpa_as_cudnn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, attn_mask, lse, dropout_p, is_causal,
                                                                  False, scale=scale)[0]

    def fused_rms_norm(x, normalized_shape, weight=None, eps=None):
        stat = list(x.shape[: x.dim() - len(normalized_shape)]) + [1] * len(normalized_shape)
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(stat, dtype=torch.float32)

    # SDPA picks its backend through a per-device stub that meta lacks (it would take the math
    # path): the composite itself is replaced in this process by CUDA's choice, cuDNN attention.
    lib.m.impl("scaled_dot_product_attention", "CompositeImplicitAutograd", sdpa_as_cudnn, False)
    # torch.library refuses meta kernels for operators with a CompositeImplicitAutograd kernel; the
    # C++ registration beneath it takes one, as CUDA's kernel does (then autograd runs
    # _fused_rms_norm_backward, whose meta kernel PyTorch has).
    lib.m.impl("_fused_rms_norm", "Meta", fused_rms_norm, False)
    return lib


def tensor_json(t, written, keep):
    """A tensor as the cost model reads it (the fields bench_gpu_cost_trace writes); `keep` holds its
    storage so that the storage's identity is not reused during the trace."""
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0 or size == 0:
            distinct *= size
    storage = t.untyped_storage()
    keep.append(storage)
    dtype = str(t.dtype).replace("torch.", "")
    entry = {"shape": list(t.shape), "dtype": DTYPE_NAMES.get(dtype, dtype), "elements": distinct,
             "itemsize": t.element_size(), "storage": storage._cdata}
    if written:
        entry["written"] = True
    return entry


DTYPE_NAMES = {"float32": "Float", "bfloat16": "BFloat16", "float16": "Half", "int64": "Long", "int32": "Int",
               "bool": "Bool", "float64": "Double", "uint8": "Byte", "complex64": "ComplexFloat",
               "float8_e4m3fn": "Float8_e4m3fn", "float8_e5m2": "Float8_e5m2"}


class Recorder(TorchDispatchMode):
    """Writes a line per operator call below autograd (the format of bench_gpu_cost_trace)."""

    def __init__(self, path):
        super().__init__()
        self.out = open(path, "w")
        self.phase = "forward"
        self.keep = []  # the storages seen: their identities stay unique during the trace
        self.active = False  # the recorded step (not the first one, which creates the optimizer state)
        self.lines = 0
        self.grouped_rows = {}  # rows of torchtitan's padded expert buffers -> rows its grouped GEMMs compute

    def write(self, op, inputs, scalars, outputs, mutates=False, view=False):
        if not self.active:
            return
        self.out.write(json.dumps({"op": op, "phase": self.phase, "inputs": inputs, "scalars": scalars,
                                   "outputs": outputs, "mutates": mutates, "view": view}) + "\n")
        self.lines += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.active:
            return result
        schema = func._schema
        inputs, scalars = [], {}
        for i, argument in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(argument.name, argument.default_value)
            written = argument.alias_info is not None and argument.alias_info.is_write
            add_values(inputs, scalars, value, argument.name, written, self.keep)
        outputs = []
        add_values(outputs, {}, result, "", False, self.keep)
        view = bool(schema.returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                            for r in schema.returns)
        name = schema.name + ("." + schema.overload_name if schema.overload_name else "")
        if schema.name == "aten::_grouped_mm":  # over the padded permutation buffer: the rows its offsets cover
            padded = next((n for n in (*args[0].shape, *args[1].shape) if n in self.grouped_rows), None)
            if padded is not None:
                scalars.update(rows_used=self.grouped_rows[padded], rows_padded=padded)
        self.write(name, inputs, scalars, outputs, schema.is_mutable, view)
        return result

    def kernel(self, name, inputs, outputs, scalars=None):
        """A kernel no ATen operator stands for (a collective, a Triton kernel), reading the tensors
        `inputs` and writing the tensors `outputs`."""
        tensors_in, tensors_out = [], []
        add_values(tensors_in, {}, list(inputs), "input", False, self.keep)
        add_values(tensors_out, {}, list(outputs), "output", False, self.keep)
        self.write(name, tensors_in, scalars or {}, tensors_out)

    def collective(self, name, tensor_in, tensor_out):
        """A one-rank NCCL collective (no ATen operator on meta): in-place when both are one buffer."""
        self.kernel(name, [tensor_in], [tensor_out], {"in_place": tensor_in is tensor_out})


def fill_indices_on_meta(recorder):
    """torchtitan's token permutation for its grouped GEMMs (generate_permute_indices) on meta
    tensors: its prefix sums run as ATen operators; its Triton kernel (fill_indices_wrapper), which
    cannot run on meta, is the -1 fill it starts with and one line for the kernel itself. The
    buffer has room for N + 8 E rows (N = tokens x top-k, E experts, groups aligned to 8 rows); its
    grouped GEMMs compute the rows up to the last offset: N with balanced routing (each expert's
    N / E rounded up to the alignment), which the recorder notes on those GEMMs."""
    import torchtitan.models.moe.kernels as kernels
    import torchtitan.models.moe.utils as moe_utils

    def fill_indices(tokens_per_expert_group, start_index_values, write_offsets, experts_per_rank, num_ranks,
                     max_len, block_size=128, max_blocks=1024):
        align, experts = moe_utils.TOKEN_GROUP_ALIGN_SIZE_M, tokens_per_expert_group.numel()
        per_expert = -(-(max_len - experts * align) // experts)  # balanced: N / E, rounded up
        recorder.grouped_rows[max_len] = experts * align * -(-max(per_expert, align) // align)
        permuted = torch.full((max_len,), -1, dtype=torch.int32, device=tokens_per_expert_group.device)
        recorder.kernel("triton::_fill_indices_kernel", [tokens_per_expert_group, start_index_values, write_offsets],
                        [permuted])
        return permuted

    kernels.fill_indices_wrapper = fill_indices


def add_values(tensors, scalars, value, name, written, keep):
    """Appends `value`'s tensors to `tensors` and, when it holds none, its value to scalars[name]."""
    if isinstance(value, torch.Tensor):
        tensors.append(tensor_json(value, written, keep))
    elif isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        for v in value:
            if isinstance(v, torch.Tensor):
                tensors.append(tensor_json(v, written, keep))
    elif isinstance(value, (bool, int, float)) or value is None:
        scalars[name] = value
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        scalars[name] = list(value)


class Bf16Autocast:
    """CUDA autocast to bf16 for meta tensors (see the module docstring): while entered, the calls of
    the model that autocast changes (F.linear, F.scaled_dot_product_attention: its lower-precision
    list; the loss casts to fp32 itself) take bf16 copies of fp32 tensors, parameters' copies cached
    until clear() (autocast's cache of a region). Module-level functions are swapped rather than a
    TorchFunctionMode used, because activation checkpointing's recomputation in backward must see
    them too."""

    def __init__(self):
        self.cache = {}
        self.saved = {}

    def cast(self, value):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == torch.bfloat16:
            return value
        cacheable = value.is_leaf and value.requires_grad  # autocast caches parameters' copies
        if cacheable and id(value) in self.cache:
            return self.cache[id(value)]
        cast = value.to(torch.bfloat16)
        if cacheable:
            self.cache[id(value)] = cast
        return cast

    def clear(self):
        self.cache.clear()

    def __enter__(self):
        for name in ("linear", "scaled_dot_product_attention"):
            original = getattr(F, name)
            self.saved[name] = original
            setattr(F, name, lambda *args, _f=original, **kwargs: _f(*(self.cast(a) for a in args),
                                                                       **{k: self.cast(v) for k, v in kwargs.items()}))
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(F, name, original)
        self.clear()


class OneRankFsdp2:
    """FSDP2's per-unit work on one rank, issued as FSDP2 issues it (see the module docstring)."""

    def __init__(self, units, recorder):
        self.units = units  # [(name, [bf16 compute parameters])]
        self.recorder = recorder
        self.shards = {name: [torch.empty(p.shape, dtype=torch.float32, device="meta") for p in params]
                       for name, params in units}

    def all_gather(self, name):
        shards = self.shards[name]
        sizes = [s.numel() for s in shards]
        inputs = [s.to(torch.bfloat16) for s in shards]  # FSDPParam.all_gather_inputs
        buffer = torch.empty(sum(sizes), dtype=torch.bfloat16, device="meta")
        torch._foreach_copy_(list(torch.split(buffer, sizes)), [i.view(-1) for i in inputs])
        self.recorder.collective("nccl::all_gather", buffer, buffer)
        outs = [torch.empty(s.shape, dtype=torch.bfloat16, device="meta") for s in shards]
        torch.split_with_sizes_copy(buffer.view(1, -1), sizes, dim=1, out=[o.view(1, -1) for o in outs])

    def reduce_scatter(self, name, params):
        grads = [p.grad if p.grad is not None else torch.empty_like(p) for p in params]
        total = sum(g.numel() for g in grads)
        staged = torch.empty(total, dtype=torch.float32, device="meta")
        torch._chunk_cat([g.view(-1) for g in grads], dim=0, num_chunks=1, out=staged.view(1, -1))
        reduced = torch.empty(total, dtype=torch.float32, device="meta")
        self.recorder.collective("nccl::reduce_scatter", staged, reduced)
        for shard, piece in zip(self.shards[name], torch.split(reduced, [g.numel() for g in grads])):
            shard.grad = piece.view(shard.shape)


def clip_grad_norm_foreach(params, max_norm):
    """torch.nn.utils.clip_grad_norm_(foreach=True) as it runs on CUDA (on meta tensors it refuses
    foreach): _foreach_norm, the norm of the norms, the clip coefficient, _foreach_mul_."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)
    return total


def fused_adamw(params, state):
    """torch.optim.AdamW(fused=True).step(): the step counts, then one fused kernel."""
    params = [p for p in params if p.grad is not None]
    if not state:
        state.update(exp_avg=[torch.zeros_like(p) for p in params], exp_avg_sq=[torch.zeros_like(p) for p in params],
                     steps=[torch.zeros((), dtype=torch.float32, device=p.device) for p in params])
    torch._foreach_add_(state["steps"], 1)
    torch._fused_adamw_(params, [p.grad for p in params], state["exp_avg"], state["exp_avg_sq"], [], state["steps"],
                        lr=8e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)


def build_fsdp2(a, recorder):
    import reference

    with torch.device("meta"):
        model = reference.Llama(a)
    reference.apply_block_ac(model, a)
    model.to(torch.bfloat16)  # the unsharded (compute) parameters; buffers stay fp32 as under FSDP2
    for name, p in model.named_buffers():
        p.data = p.data.float()
    layer_units = [(f"layers.{n}", list(block.parameters())) for n, block in model.layers.items()]
    root_params = [p for n, p in model.named_parameters() if not n.startswith("layers.")]
    fsdp = OneRankFsdp2(layer_units + [("root", root_params)], recorder)

    def cast_forward_inputs(module, args):  # MixedPrecisionPolicy.cast_forward_inputs of each block
        return tuple(x.to(torch.bfloat16) if torch.is_tensor(x) and x.is_floating_point() else x for x in args)

    def gather_before_forward(name):
        return lambda module, args: fsdp.all_gather(name)

    for n, block in model.layers.items():
        block.register_forward_pre_hook(gather_before_forward(f"layers.{n}"))
        block.register_forward_pre_hook(cast_forward_inputs)
    model.register_forward_pre_hook(gather_before_forward("root"))
    optimizer_state = {}

    def loss_fn(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))

    def after_backward():
        for name, params in layer_units:  # backward: gathered again (resharded after forward), then reduced
            fsdp.all_gather(name)
            fsdp.reduce_scatter(name, params)
        fsdp.reduce_scatter("root", root_params)

    def optimizer_step():
        shards = [s for name, _ in fsdp.units for s in fsdp.shards[name]]
        clip_grad_norm_foreach(shards, 1.0)
        fused_adamw(shards, optimizer_state)

    return model, loss_fn, after_backward, optimizer_step, None


def build_torchtitan(a, recorder):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch._utils._get_available_device_type = lambda: "cpu"  # torchtitan's mesh on a one-rank fake group
    import reference
    from torchtitan.components.loss import build_cross_entropy_loss

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    if a.impl == "torchtitan_moe":
        fill_indices_on_meta(recorder)
    job, parallel_dims, model = reference.torchtitan_model(a, 1, "fused")
    model.train()
    sum_loss = build_cross_entropy_loss(job)
    optimizer_state = {}
    step_pre_hooks = []
    if a.impl == "torchtitan_moe":  # the expert-bias update: torchtitan's own hook, before its optimizer step
        from torchtitan.components.optimizer import build_optimizers_with_moe_load_balancing

        job.optimizer.implementation = "foreach"  # a container meta parameters can build; only its hook runs
        container = build_optimizers_with_moe_load_balancing([model], job.optimizer, parallel_dims)
        step_pre_hooks = [lambda hook=hook: hook(container, (), {})
                          for hook in container._optimizer_step_pre_hooks.values()]

    def loss_fn(logits, labels):
        return sum_loss(logits, labels) / labels.numel()

    def optimizer_step():
        params = list(model.parameters())
        clip_grad_norm_foreach(params, 1.0)  # torchtitan's clip_grad_norm_ on one rank
        for hook in step_pre_hooks:
            hook()
        fused_adamw(params, optimizer_state)

    autocast = Bf16Autocast() if a.dtype == "bfloat16" else None
    return model, loss_fn, lambda: None, optimizer_step, autocast


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["fsdp2", "torchtitan", "torchtitan_moe"], required=True)
    p.add_argument("--out", required=True)
    for key, default in dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, vocab_size=128256,
                             seq_len=8192, local_batch=1, head_dim=0, qk_norm=0, moe_experts=0, moe_top_k=2,
                             moe_hidden=64).items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=default)
    p.add_argument("--ffn-dim-multiplier", type=float, default=1.5)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--ac", default="op")
    a = p.parse_args()
    a.global_batch = a.local_batch
    a.ep, a.load_balance_coeff = 1, 1e-3  # one GPU; torchtitan's expert-bias rate (titan's trace uses the same)
    if (a.impl == "torchtitan_moe") != (a.moe_experts > 0):
        p.error("--impl torchtitan_moe and --moe-experts > 0 go together (torchtitan's Qwen3-MoE)")
    return a


def main():
    a = parse_args()
    torch.set_num_threads(1)
    _cuda_choices = register_cuda_choices()  # noqa: F841 (kept alive for the trace)
    recorder = Recorder(a.out)
    build = build_fsdp2 if a.impl == "fsdp2" else build_torchtitan  # torchtitan and torchtitan_moe
    model, loss_fn, after_backward, optimizer_step, autocast = build(a, recorder)
    tokens = torch.empty((a.local_batch, a.seq_len + 1), dtype=torch.long, device="meta")

    def step(trace):
        recorder.active = trace is not None
        recorder.phase = "forward"
        for p in model.parameters():
            p.grad = None
        modes = [m for m in (autocast, trace) if m is not None]
        for m in modes:
            m.__enter__()
        try:
            logits = model(tokens[:, :-1])  # [B, T, vocab]
            loss = loss_fn(logits, tokens[:, 1:])
            if autocast is not None:
                autocast.clear()  # the forward's autocast region ends
            recorder.phase = "backward"
            loss.backward()
            after_backward()
            recorder.phase = "optimizer"
            optimizer_step()
        finally:
            for m in reversed(modes):
                m.__exit__(None, None, None)

    step(None)  # creates the optimizer state
    step(recorder)
    recorder.out.close()
    print(f"trace_peers: {recorder.lines} operator calls of one step of {a.impl} -> {a.out}")


if __name__ == "__main__":
    main()
