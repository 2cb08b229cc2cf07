#!/usr/bin/env python3
"""Reads a titan checkpoint directory (docs/checkpoint.md) with nothing but json, zlib and torch,
and checks it against the values checkpoint_driver saved.

    read_checkpoint.py CHECKPOINT_DIR        # e.g. build/tests/checkpoint/checkpoints/fsdp2_tp2/step-1

`load_checkpoint` is a complete reader: it rebuilds every global tensor from its shards, verifying
each block's CRC-32. The script then compares each tensor with the formula of
tests/support/checkpoint_fixtures.hpp and each shard with what the safetensors library reads.
"""
import json
import os
import sys
import zlib

import torch
from safetensors import safe_open

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def load_checkpoint(directory):
    """Returns (metadata, {name: global tensor}) of a titan checkpoint directory."""
    with open(os.path.join(directory, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["format"] == "titan-checkpoint" and meta["version"] == 1, meta["format"]
    assert meta["checksum"] == "crc32"
    block = meta["block_bytes"]
    tensors = {}
    for t in meta["tensors"]:
        dtype = DTYPES[t["dtype"]]
        full = torch.empty(t["shape"], dtype=dtype)
        for s in t["shards"]:
            with open(os.path.join(directory, s["file"]), "rb") as f:
                f.seek(s["begin"])
                data = f.read(s["end"] - s["begin"])
            assert len(data) == s["end"] - s["begin"], f"{s['file']} is truncated ({t['name']})"
            crcs = [zlib.crc32(data[i:i + block]) for i in range(0, len(data), block)]
            assert crcs == s["crc32"], f"checksum mismatch in {s['file']} for {t['name']}"
            shard = torch.frombuffer(bytearray(data), dtype=dtype).reshape(s["sizes"]) if data else \
                torch.empty(s["sizes"], dtype=dtype)
            index = tuple(slice(o, o + n) for o, n in zip(s["offsets"], s["sizes"]))
            full[index] = shard
        tensors[t["name"]] = full
    return meta, tensors


# The tensors of checkpoint_fixtures.hpp (specs()), in order: name, shape, dtype.
SPECS = [("layers.0.wq", [10, 6], torch.float32), ("layers.0.wo", [6, 10], torch.float32),
         ("layers.0.norm", [7], torch.float32), ("embed", [5, 3, 2], torch.bfloat16),
         ("counts", [9], torch.int64), ("scale", [], torch.float64), ("wide", [3, 257], torch.float16),
         ("layers.0.wqkv", [14, 3], torch.float32)]


def global_tensor(index, shape, dtype):
    numel = 1
    for s in shape:
        numel *= s
    values = torch.arange(numel, dtype=torch.float64).mul(0.37).add(float(index)).sin()
    if dtype in (torch.int64, torch.int32):
        values = values.mul(1000).round()
    return values.to(dtype).reshape(shape)


def main():
    directory = sys.argv[1]
    meta, tensors = load_checkpoint(directory)
    failures = 0
    for index, (name, shape, dtype) in enumerate(SPECS):
        got = tensors.get("extra." + name)
        expected = global_tensor(index, shape, dtype)
        if got is None or got.dtype != dtype or not torch.equal(got, expected):
            print(f"FAILED: tensor extra.{name} differs from the saved global tensor")
            failures += 1
    # Each rank file is a valid safetensors file holding that rank's shards.
    for t in meta["tensors"]:
        for s in t["shards"]:
            with safe_open(os.path.join(directory, s["file"]), framework="pt") as f:
                shard = f.get_tensor(s.get("key", t["name"]))  # a fused tensor's blocks: "name#k"
            index = tuple(slice(o, o + n) for o, n in zip(s["offsets"], s["sizes"]))
            if list(shard.shape) != s["sizes"] or not torch.equal(shard, tensors[t["name"]][index]):
                print(f"FAILED: safetensors reads another {t['name']} from {s['file']}")
                failures += 1
    if meta["extra"].get("mesh") != "fsdp_tp" or len(meta["rank_extra"]) != meta["world_size"]:
        print("FAILED: extra state")
        failures += 1
    print(f"read {len(tensors)} tensors saved on {meta['world_size']} ranks: "
          f"{'OK' if failures == 0 else str(failures) + ' failures'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
