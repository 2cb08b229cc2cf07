"""Loads a model exported by titan's save_hf with transformers and checks its logits.

  check_export.py EXPORT_DIR REFERENCE_SAFETENSORS ARCHITECTURE [TOLERANCE]

Runs AutoModelForCausalLM on the reference input_ids and compares with the reference logits (made
from the original transformers model by make_reference.py). Prints the max abs difference; exits
1 if it exceeds TOLERANCE (default 1e-5) or the architecture differs, 2 on a load error.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    export_dir, reference, architecture = sys.argv[1:4]
    tolerance = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-5
    torch.set_num_threads(1)
    ref = load_file(reference)
    try:
        model = AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="eager").float()
    except Exception as error:  # noqa: BLE001 - report any load failure as such
        print(f"check_export: transformers cannot load {export_dir}: {error}")
        return 2
    if type(model).__name__ != architecture:
        print(f"check_export: loaded {type(model).__name__}, expected {architecture}")
        return 1
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    diff = (logits - ref["logits"]).abs().max().item()
    print(f"check_export: {export_dir}: max abs logits diff {diff:.3g}")
    return 0 if diff <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
