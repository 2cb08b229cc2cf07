"""GPU cost model: prices every kernel of a traced training step on a GPU description.

A trace (bench_gpu_cost_trace for titan, trace_peers.py for the Python peers) has one JSON line
per operator call below autograd. Each becomes zero or more kernels:
  - views, allocations and metadata operators: no kernel;
  - matmuls (mm, addmm, addmm_, bmm, baddbmm, _scaled_mm, _grouped_mm): 2·M·N·K FLOPs at the matmul
    rate (bf16's; float8's _scaled_mm at fp8's, with the same efficiency; the term addmm adds is
    read in the GEMM's epilogue; a grouped GEMM's M is the rows its offsets cover, all groups
    together);
  - fused attention (cuDNN, flash, efficient): 4·B·H·Sq·Sk·D FLOPs forward (half when causal),
    2.5x that backward (five matmuls instead of two), at the attention rate;
  - one-rank NCCL collectives: a launch, and a copy when not in place;
  - multi-tensor kernels (_foreach_*, _fused_adamw_, titan::adamw_copy_): their bytes, one launch
    per group of tensors or of 320 chunks of 65,536 elements, as CUDA's multi_tensor_apply
    launches them;
  - everything else is memory-bound: the bytes it reads (distinct elements of its inputs; gathers
    such as embedding, index and nll_loss read only what they pick) and writes (its outputs, or the
    arguments it writes in place; in-place scatters only the elements they pick).
A kernel takes launch + max(FLOPs / rate, bytes / bandwidth). The step time is the sum over
kernels (one stream, one GPU: the GPU is never idle waiting for the host at these shapes, an
assumption the GPU kit's profile stage checks).

torch.compile is modelled by what Inductor does to such a step: consecutive memory-bound kernels
of the forward and backward (not the optimizer, not FSDP's copies) become one kernel that reads
what the group takes from outside it and writes what is read after it (data identity by storage);
sorts, top-k and histograms stay kernels of their own (UNFUSED).

Rates are the GPU description's peaks times efficiencies calibrated on measured runs
(calibrate()); GPUS lists each figure's source.
"""
import json
import math
from collections import defaultdict

# Peak figures of each GPU (dense bf16 tensor-core rate, HBM bandwidth), with their source.
GPUS = {
    "H200": dict(name="NVIDIA H200 SXM (141 GB HBM3e)", bf16_tflops=989.4, fp8_tflops=1978.9, hbm_tb_s=4.8,
                 source="NVIDIA H200 Tensor Core GPU datasheet (2024): 989 TFLOPS bf16 dense "
                        "(1,979 with sparsity), 1,979 TFLOPS fp8 dense, 4.8 TB/s"),
    "H100": dict(name="NVIDIA H100 SXM (80 GB HBM3)", bf16_tflops=989.4, fp8_tflops=1978.9, hbm_tb_s=3.35,
                 source="NVIDIA H100 Tensor Core GPU datasheet (2023): 989 TFLOPS bf16 dense "
                        "(1,979 with sparsity), 1,979 TFLOPS fp8 dense, 3.35 TB/s"),
}

# Efficiencies against the peaks: what calibrate() found on the H200 eager rows of 2026-11-26
# (docs/performance.md, "GPU cost model"), with the matmul efficiency pinned: the step's GEMMs at 92%
# of the 8192^3 bf16 rate measured in that run (777 TFLOP/s = 0.785 of peak). The three rows alone
# cannot tell matmul from attention time (both scale with the same FLOPs), hence the anchor.
MATMUL_ANCHOR = 0.72
DEFAULT_EFFICIENCY = dict(matmul=MATMUL_ANCHOR, attention=0.29, bandwidth=0.95, launch_us=6.0)

NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::_reshape_alias",
    "aten::set_", "aten::resize_", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item",
    "aten::_has_compatible_shallow_copy_type", "aten::record_stream", "aten::detach_",
}
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm",
           "aten::_grouped_mm"}
# Matmuls whose first input is the term added to the product (its own epilogue: no kernel of its own).
MATMULS_ADDING = {"aten::addmm", "aten::addmm_", "aten::baddbmm"}
ATTENTION_FORWARD = {"aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention",
                     "aten::_scaled_dot_product_efficient_attention"}
ATTENTION_BACKWARD = {name + "_backward" for name in ATTENTION_FORWARD}
# Operators that read only the rows they pick from their first input (the table / the logits).
GATHERS = {"aten::embedding", "aten::nll_loss_forward", "aten::index_select", "aten::gather", "aten::index"}
# In-place scatters: they read and write only the elements their index picks in the first input
# (index_put_ without accumulate only writes them).
SCATTERS = {"aten::scatter_add_", "aten::scatter_", "aten::index_put_", "aten::index_add_"}
# index_put with accumulate on CUDA sorts its indices first (cub's radix sort: a few launches) so
# that it adds duplicates in a fixed order: the deterministic scatter-add of indexing's gradient.
SORTED_ACCUMULATE_LAUNCHES = 5
# In-place operators that do not read what they overwrite.
OVERWRITES = {"aten::copy_", "aten::fill_", "aten::zero_", "aten::_foreach_copy_", "aten::normal_", "aten::uniform_"}
# Memory-bound kernels torch.compile leaves whole (Inductor falls back to ATen's kernel, or runs the
# user's Triton kernel as it is): they end a fused group.
UNFUSED = {"aten::sort", "aten::topk", "aten::histc", "aten::bincount", "triton::_fill_indices_kernel"}
# multi_tensor_apply: tensors per launch by how many lists the kernel walks, chunks per launch.
TENSORS_PER_LAUNCH = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
CHUNK_ELEMENTS, CHUNKS_PER_LAUNCH = 65536, 320
# Lists of equal length a multi-tensor kernel walks (the others walk one, with scalars).
LIST_DEPTH = {"aten::_fused_adamw_": 4, "aten::_fused_adam_": 4, "aten::_foreach_copy_": 2, "titan::adamw_copy_": 5}
# titan's multi-tensor kernels (include/titan/fused/cuda/): AdamW that also writes the bf16 copy.
TITAN_MULTI_TENSOR = {"titan::adamw_copy_"}
# Multi-tensor kernels that write a list without reading it: which one (0-based), by the kernel.
WRITE_ONLY_LIST = {"titan::adamw_copy_": 4}  # the compute copies
# titan's fused CUDA kernels (include/titan/fused/cuda/) that read some inputs twice: which ones.
REREAD_INPUTS = {
    "titan::cross_entropy_loss_and_grad": lambda inputs: inputs[:1],  # logits: max and sum of exp, then the gradient
    # (grad_sum,) grad_normed, sum, weight, rstd: the input gradient's pass, then the weight's
    "titan::add_rms_norm_backward": lambda inputs: inputs[-4:-2],
    # grad [T, dim], out [N, dim], (weight [N],) slot: each of the N rows reads its token's gradient row
    "titan::moe_combine_backward": lambda inputs: inputs[:1] * max(0, round(inputs[1]["elements"] /
                                                                             max(1, inputs[0]["elements"])) - 1),
}
# titan operators whose CUDA implementation launches more than one kernel: a count, or a function of
# the inputs. The MoE combine converts a weight that is not fp32 (forward and backward) and the
# weight's fp32 gradient back to its dtype; its forward fills and writes each slot's row first.
LAUNCHES = {
    "titan::add_rms_norm_backward": 3,  # input gradient, weight gradient partials, their sum
    "titan::moe_combine_forward": lambda inputs: 3 + (len(inputs) == 3 and inputs[1]["dtype"] != "Float"),
    "titan::moe_combine_backward": lambda inputs: 1 + 2 * (len(inputs) == 4 and inputs[2]["dtype"] != "Float"),
}
# titan's CUDA kernels that return before touching memory in the step traced: the cross entropy's
# backward rescaling when the incoming gradient equals the grad_scale its forward used (titan's
# trainer and the trace pass the factor the loss is multiplied by); a launch and a scalar read.
SKIPPED_ON_DEVICE = {"titan::cross_entropy_rescale_grad_"}
# Fused optimizers whose second list (the gradients) is read, not written, whatever the schema says.
READ_ONLY_SECOND_LIST = {"aten::_fused_adamw_", "aten::_fused_adam_", "titan::adamw_copy_"}


def base_name(op):
    return op.split(".")[0]


def tensor_bytes(t):
    return t["elements"] * t["itemsize"]


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def kernel(event):
    """The kernel an event runs: dict(kind, launches, bytes, flops, reads, writes) or None."""
    op, name = event["op"], base_name(event["op"])
    if event["view"] or name in NO_KERNEL:
        return None
    inputs, outputs = event["inputs"], event["outputs"]
    reads = {t["storage"] for t in inputs}
    writes = {t["storage"] for t in outputs} | {t["storage"] for t in inputs if t.get("written")}
    storage_bytes = {}  # the bytes of each storage it touches (the largest view of it named): for fuse
    for t in inputs + outputs:
        storage_bytes[t["storage"]] = max(storage_bytes.get(t["storage"], 0), tensor_bytes(t))
    k = dict(op=op, phase=event["phase"], launches=1, flops=0.0, reads=reads, writes=writes,
             storage_bytes=storage_bytes)
    all_bytes = sum(tensor_bytes(t) for t in inputs + outputs)
    if name.startswith("nccl::"):
        in_place = event["scalars"].get("in_place", False)
        k.update(kind="collective", bytes=0 if in_place else all_bytes)
        return k
    if name in MATMULS:
        factors = inputs[1:] if name in MATMULS_ADDING else inputs
        a, b = [t["shape"] for t in factors if len(t["shape"]) >= 2][:2]
        m, kk, n = a[-2], a[-1], b[-1]
        batch = math.prod(a[:-2]) if len(a) > 2 else 1
        # A grouped GEMM over a padded buffer computes only the rows its offsets cover: the tracer
        # says how many (rows_used of the buffer's rows_padded) where they differ.
        used = event["scalars"].get("rows_used", 1) / event["scalars"].get("rows_padded", 1)
        k.update(kind="matmul", flops=2.0 * batch * m * n * kk * used, bytes=all_bytes)
        if name == "aten::_scaled_mm":  # float8 operands: the fp8 tensor-core rate
            k["fp8"] = True
        return k
    if name in ATTENTION_FORWARD or name in ATTENTION_BACKWARD:
        backward = name in ATTENTION_BACKWARD
        tensors = inputs[1:4] if backward else inputs[:3]  # backward: (grad_out, q, k, v, ...)
        q, key = tensors[0]["shape"], tensors[1]["shape"]
        causal = 0.5 if event["scalars"].get("is_causal") else 1.0
        forward_flops = 4.0 * q[0] * q[1] * q[2] * key[2] * q[3] * causal
        k.update(kind="attention", flops=forward_flops * (2.5 if backward else 1.0), bytes=all_bytes)
        return k
    if name.startswith("aten::_foreach_") or name.startswith("aten::_fused_adam") or name in TITAN_MULTI_TENSOR:
        tensors = [t for t in inputs if t["shape"] != []] or inputs  # the lists walked, not scalars
        depth = LIST_DEPTH.get(name, 1)
        per_list = max(1, len(tensors) // depth)
        chunks = sum(math.ceil(t["elements"] / CHUNK_ELEMENTS) for t in tensors) / depth
        launches = max(math.ceil(per_list / TENSORS_PER_LAUNCH[depth]), math.ceil(chunks / CHUNKS_PER_LAUNCH))
        written = [t for t in inputs if t.get("written")]
        if name in READ_ONLY_SECOND_LIST and event["scalars"].get("grad_scale", "given") is None:
            # The schema marks the gradients written; the kernel writes them back only when it
            # scales them (grad_scale given: clipping or AMP unscaling inside the step).
            written = [t for t in written if not any(t is g for g in inputs[per_list:2 * per_list])]
        written = sum(tensor_bytes(t) for t in written)
        read = all_bytes - (written if name in OVERWRITES else 0)  # a copy's destination is not read
        if name in WRITE_ONLY_LIST:
            first = WRITE_ONLY_LIST[name] * per_list
            read -= sum(tensor_bytes(t) for t in inputs[first:first + per_list])
        k.update(kind="multi_tensor", launches=max(1, launches), bytes=read + written)
        return k
    # Memory-bound.
    if name in SKIPPED_ON_DEVICE:
        k.update(kind="memory", bytes=sum(tensor_bytes(t) for t in inputs if t["elements"] == 1), writes=set())
        return k
    accumulates = event["scalars"].get("accumulate", True)
    if name in SCATTERS:  # the elements it picks in its first input, read (unless overwritten) and written
        picked = max(t["elements"] for t in inputs[1:]) * inputs[0]["itemsize"]
        read = (picked if accumulates else 0) + sum(tensor_bytes(t) for t in inputs[1:])
    elif name in GATHERS:
        picked = outputs[0]["elements"] if outputs else 0
        read = picked * inputs[0]["itemsize"] + sum(tensor_bytes(t) for t in inputs[1:])
    elif event["mutates"]:
        overwrites = name in OVERWRITES or name.endswith("_out") or op.endswith(".out")
        read = sum(tensor_bytes(t) for t in inputs if not (t.get("written") and overwrites))
    else:
        read = sum(tensor_bytes(t) for t in inputs)
    if name in REREAD_INPUTS:
        read += sum(tensor_bytes(t) for t in REREAD_INPUTS[name](inputs))
    if name in SCATTERS:
        written = picked
    elif event["mutates"]:
        written = sum(tensor_bytes(t) for t in inputs if t.get("written"))
    else:
        written = sum(tensor_bytes(t) for t in outputs)
    if name == "aten::nll_loss_backward":  # zero-fills grad_input, then writes one entry per row
        read = sum(tensor_bytes(t) for t in inputs if t["shape"] != outputs[0]["shape"])
    sorts = name in ("aten::index_put", "aten::index_put_", "aten::_index_put_impl_") and \
        event["scalars"].get("accumulate") is True
    launches = LAUNCHES.get(name, 1)
    k.update(kind="memory", launches=SORTED_ACCUMULATE_LAUNCHES if sorts else
             launches(inputs) if callable(launches) else launches, bytes=read + written)
    return k


def kernels(events):
    """The kernels of a trace's events."""
    return [k for k in (kernel(e) for e in events) if k is not None]


def fuse(ks, phases=("forward", "backward")):
    """torch.compile's fusion of memory-bound kernels (see the module docstring)."""
    # Which kernels read each storage, in order: a group's write is external if read after it.
    readers = defaultdict(list)
    for i, k in enumerate(ks):
        for s in k["reads"]:
            readers[s].append(i)
    fused, group = [], []

    def close():
        if not group:
            return
        members = [ks[i] for i in group]
        written = set().union(*(m["writes"] for m in members))
        produced_by = {}
        for i in group:
            for s in ks[i]["writes"]:
                produced_by.setdefault(s, i)
        read_bytes, write_bytes = 0, 0
        sizes = {}  # bytes of each storage the group touches
        for m in members:
            for storage, size in m["storage_bytes"].items():
                sizes[storage] = max(sizes.get(storage, 0), size)
        for s in set().union(*(m["reads"] for m in members)):
            if s not in produced_by or min(i for i in group if s in ks[i]["reads"]) <= produced_by[s]:
                read_bytes += sizes.get(s, 0)
        for s in written:
            if any(r > group[-1] for r in readers[s]) or s not in readers:
                write_bytes += sizes.get(s, 0)
        fused.append(dict(op=f"fused[{len(group)}]", phase=members[0]["phase"], kind="memory", launches=1,
                          flops=0.0, bytes=read_bytes + write_bytes, reads=set(), writes=set()))
        group.clear()

    for i, k in enumerate(ks):
        if k["kind"] == "memory" and k["phase"] in phases and base_name(k["op"]) not in UNFUSED:
            group.append(i)
        else:
            close()
            fused.append(k)
    close()
    return fused


def peak_tflops(k, gpu):
    """The tensor-core rate a kernel's FLOPs run at: fp8 for float8 matmuls, else bf16."""
    return gpu["fp8_tflops"] if k.get("fp8") else gpu["bf16_tflops"]


def kernel_ms(k, gpu, eff):
    rate = {"matmul": eff["matmul"], "attention": eff["attention"]}.get(k["kind"])
    compute = k["flops"] / (peak_tflops(k, gpu) * 1e12 * rate) if rate else 0.0
    memory = k["bytes"] / (gpu["hbm_tb_s"] * 1e12 * eff["bandwidth"])
    return 1e3 * (k["launches"] * eff["launch_us"] * 1e-6 + max(compute, memory))


def summary(ks, gpu, eff):
    """Kernels per step, GB moved by memory-bound kernels, TFLOPs of matmul and attention, ms."""
    s = dict(kernels=sum(k["launches"] for k in ks), memory_gb=0.0, matmul_tflop=0.0, attention_tflop=0.0, ms=0.0,
             by_kind=defaultdict(float))
    for k in ks:
        ms = kernel_ms(k, gpu, eff)
        s["ms"] += ms
        s["by_kind"][k["kind"]] += ms
        if k["kind"] in ("memory", "multi_tensor", "collective"):
            s["memory_gb"] += k["bytes"] / 1e9
        elif k["kind"] == "matmul":
            s["matmul_tflop"] += k["flops"] / 1e12
        else:
            s["attention_tflop"] += k["flops"] / 1e12
    return s


def top_memory_ops(ks, gpu, eff, n=12):
    """The memory-bound operators costing most time: (op, calls, GB, ms)."""
    agg = defaultdict(lambda: [0, 0.0, 0.0])
    for k in ks:
        if k["kind"] == "matmul" or k["kind"] == "attention":
            continue
        a = agg[k["op"]]
        a[0] += 1
        a[1] += k["bytes"] / 1e9
        a[2] += kernel_ms(k, gpu, eff)
    return sorted(((op, *v) for op, v in agg.items()), key=lambda r: -r[3])[:n]


def calibrate(rows, gpu, fixed=None):
    """Efficiencies minimising the squared log error of the predicted step times of `rows`
    ({name: (kernels, measured_ms)}), by a grid over physically plausible ranges; `fixed` pins some
    of them (e.g. {"bandwidth": 0.85})."""
    import numpy as np

    grid = dict(matmul=np.arange(0.55, 0.805, 0.01), attention=np.arange(0.25, 0.705, 0.01),
                bandwidth=np.arange(0.60, 0.955, 0.05), launch_us=np.array([2.0, 3.0, 4.0, 5.0, 6.0, 8.0]))
    for key, value in (fixed or {}).items():
        grid[key] = np.array([value])
    arrays = {}
    for name, (ks, measured) in rows.items():
        kinds = np.array([k["kind"] for k in ks])
        peaks = np.array([peak_tflops(k, gpu) * 1e12 for k in ks])
        arrays[name] = (np.array([k["launches"] for k in ks], dtype=float), np.array([k["flops"] for k in ks]) / peaks,
                        np.array([k["bytes"] for k in ks], dtype=float), kinds == "matmul", kinds == "attention",
                        measured)
    best = None
    hbm = gpu["hbm_tb_s"] * 1e12
    for mm in grid["matmul"]:
        for at in grid["attention"]:
            for bw in grid["bandwidth"]:
                memory = {name: a[2] / (hbm * bw) for name, a in arrays.items()}
                for lu in grid["launch_us"]:
                    err = 0.0
                    for name, (launches, peak_seconds, _, is_mm, is_at, measured) in arrays.items():
                        compute = np.where(is_mm, peak_seconds / mm, np.where(is_at, peak_seconds / at, 0.0))
                        seconds = launches.sum() * lu * 1e-6 + np.maximum(compute, memory[name]).sum()
                        err += math.log(1e3 * seconds / measured) ** 2
                    if best is None or err < best[0]:
                        best = (err, dict(matmul=round(float(mm), 2), attention=round(float(at), 2),
                                          bandwidth=round(float(bw), 2), launch_us=float(lu)))
    return best[1]
