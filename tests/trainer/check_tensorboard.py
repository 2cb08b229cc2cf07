#!/usr/bin/env python3
"""TensorBoard files written by examples/common's TensorBoardWriter, read back by tensorboard.

Writes a list of scalars (tags, steps, values, wall times) to spec.json, runs the C++ test case
that writes them with TensorBoardWriter, then checks every TFRecord checksum with tensorboard's
own masked CRC-32C and reads the events with EventAccumulator: the file version, the tags, and
each (wall_time, step, value) must come back exactly (values as float32).
"""
import argparse
import glob
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

CASE = "metrics: TensorBoard scalars*"

SPEC = [
    {"tag": "loss", "step": 1, "value": 10.375, "wall_time": 1700000000.25},
    {"tag": "loss", "step": 2, "value": 3.14159265358979, "wall_time": 1700000001.5},
    {"tag": "loss", "step": 10, "value": -0.0001, "wall_time": 1700000002.125},
    {"tag": "lr", "step": 1, "value": 3e-4, "wall_time": 1700000000.25},
    {"tag": "lr", "step": 2**40, "value": 1e-30, "wall_time": 1700000003.0},
    {"tag": "val/perplexity", "step": 300, "value": 123456.789, "wall_time": 1700000004.0},
    {"tag": "grad_norm", "step": 5, "value": "nan", "wall_time": 1700000005.0},
]


def check_records(path):
    """Every record's length and data checksums, verified independently of the reader."""
    data = open(path, "rb").read()
    offset, count = 0, 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        payload = data[offset + 12:offset + 12 + length]
        (data_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
        assert length_crc == masked_crc32c(header), f"record {count}: bad length checksum"
        assert data_crc == masked_crc32c(payload), f"record {count}: bad data checksum"
        offset += 16 + length
        count += 1
    assert offset == len(data)
    return count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--exe", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    events = os.path.join(args.workdir, "events")
    os.makedirs(events)
    spec_path = os.path.join(args.workdir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(SPEC, f)

    env = dict(os.environ, TITAN_TRAINER_TB_SPEC=spec_path, TITAN_TRAINER_TB_DIR=events)
    run = subprocess.run([args.exe, f"--test-case={CASE}", "--no-skip"], env=env, capture_output=True, text=True)
    sys.stdout.write(run.stdout + run.stderr)
    if run.returncode != 0 or "1 passed" not in run.stdout:
        print("check_tensorboard.py: the C++ writer case failed or did not run", file=sys.stderr)
        return 1

    files = glob.glob(os.path.join(events, "events.out.tfevents.*"))
    assert len(files) == 1, files
    assert check_records(files[0]) == len(SPEC) + 1  # file_version first

    acc = EventAccumulator(events, size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.file_version == 2.0, acc.file_version  # "brain.Event:2"
    tags = sorted(acc.Tags()["scalars"])
    assert tags == sorted({s["tag"] for s in SPEC}), tags
    for tag in tags:
        want = [s for s in SPEC if s["tag"] == tag]
        got = acc.Scalars(tag)
        assert len(got) == len(want), (tag, got)
        for g, w in zip(got, want):
            assert g.step == w["step"], (tag, g, w)
            assert g.wall_time == w["wall_time"], (tag, g, w)
            if w["value"] == "nan":
                assert math.isnan(g.value), (tag, g)
            else:
                assert g.value == float(np.float32(w["value"])), (tag, g.value, w["value"])
    print(f"check_tensorboard.py: {len(SPEC)} scalars of {len(tags)} tags read back exactly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
