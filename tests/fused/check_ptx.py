#!/usr/bin/env python3
"""What can be checked of titan's CUDA kernels without a GPU, in the code nvcc generates for sm_90:
every kernel instantiated for 16-byte packs (8 bf16 or fp16, 4 fp32 elements) reads with 16-byte
loads (`ld.global.v4` / `ld.global.nc.v4`) and writes its outputs with 16-byte stores
(`st.global.wb.v4`; a pack of float8 bytes with one 8- or 4-byte store), and no titan kernel spills registers to local memory (`ptxas -v`). A change
that loses the packs' alignment, or splits them into element accesses, fails here instead of
costing bandwidth unseen until a GPU runs the kit.

  check_ptx.py --ptx kernels.ptx --ptxas /usr/local/cuda/bin/ptxas
"""
import argparse
import re
import subprocess
import sys

PACK_WIDTH = {"f": 4, "N3c104HalfE": 8, "N3c108BFloat16E": 8}
# Kernels whose pack instantiations write no tensor of their dtype: add_rms_norm's weight gradient
# writes fp32 partial sums, one column per thread.
NO_PACK_STORES = {"add_rms_norm_weight_grad"}
# Kernels that write one-byte elements (float8) from packs: one store of a pack's width in bytes
# (8 bytes from 8 bf16 or fp16 elements, 4 from 4 fp32 ones); the transposing cast writes chunks
# of 8 bytes whatever its input's pack width.
EIGHT_BYTE_STORE = r"st\.global(\.wb)?\.(u64|b64|v2\.(u32|b32))\s"
BYTE_PACK_STORES = {"float8_cast_kernel": {8: EIGHT_BYTE_STORE, 4: r"st\.global(\.wb)?\.(u32|b32)\s"},
                    "float8_cast_transpose_kernel": {8: EIGHT_BYTE_STORE, 4: EIGHT_BYTE_STORE}}


def entries(ptx):
    """(mangled name, body) of every kernel in the PTX."""
    starts = [m for m in re.finditer(r"^\.(?:visible )?\.?entry (\S+)\(", ptx, re.M)]
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(ptx)
        yield m.group(1), ptx[m.start():end]


def titan_kernel(name):
    """(kernel, dtype code, width) of a titan kernel's mangled name, or None."""
    m = re.match(r"_ZN5titan4cuda6detail(\d+)", name)
    if not m:
        return None
    length = int(m.group(1))
    rest = name[m.end():]
    kernel, args = rest[:length], rest[length:]
    dtype = next((code for code in PACK_WIDTH if args.startswith("I" + code)), None)
    width = re.search(r"Li(\d+)E", args)
    return kernel, dtype, int(width.group(1)) if width else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptx", required=True, help="kernels.cu compiled to PTX for sm_90")
    parser.add_argument("--ptxas", required=True, help="the CUDA toolkit's ptxas")
    args = parser.parse_args()
    ptx = open(args.ptx).read()
    failures, packed = [], 0
    for name, body in entries(ptx):
        parsed = titan_kernel(name)
        if parsed is None:
            continue
        kernel, dtype, width = parsed
        if dtype is None or width != PACK_WIDTH[dtype]:
            continue
        packed += 1
        if not re.search(r"ld\.global(\.nc)?\.v4\.", body):
            failures.append(f"{kernel} ({dtype}, packs of {width}): no 16-byte load in {name}")
        if kernel in BYTE_PACK_STORES:
            if not re.search(BYTE_PACK_STORES[kernel][width], body):
                failures.append(f"{kernel} ({dtype}, packs of {width}): no {width}-byte store in {name}")
        elif kernel not in NO_PACK_STORES and not re.search(r"st\.global(\.wb|\.cg|\.cs)?\.v4\.", body):
            failures.append(f"{kernel} ({dtype}, packs of {width}): no 16-byte store in {name}")
    if packed == 0:
        failures.append(f"no titan kernel instantiated for packs in {args.ptx}")

    # Registers and spills of every titan kernel.
    report = subprocess.run([args.ptxas, "-arch=sm_90", "-O3", "-v", args.ptx, "-o", "/dev/null"],
                            capture_output=True, text=True)
    if report.returncode != 0:
        failures.append(f"ptxas failed: {report.stderr.strip()[:2000]}")
    current, kernels = None, 0
    for line in report.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1) if titan_kernel(m.group(1)) else None
            kernels += current is not None
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current and (int(m.group(1)) or int(m.group(2))):
            failures.append(f"{current}: spills registers ({line.strip()})")
    print(f"check_ptx: {packed} pack instantiations, {kernels} titan kernels through ptxas")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
