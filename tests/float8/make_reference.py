"""Reference results of torchao's float8 linear layers for test_float8.cpp.

For each recipe torchao names (tensorwise, rowwise, rowwise_with_gw_hp) and input dtype (float32,
bfloat16), a linear layer [in 64 -> out 48] (bias only in the tensorwise float32 case) is converted
with torchao.float8.convert_to_float8_training and run forward and backward on fixed tensors:
x [2, 8, 64] with a few outliers (so that amaxes and saturation matter), dy [2, 8, 48]. Written to
--out (safetensors, by the safetensors package), per case "<recipe>.<dtype>.":
  x, weight, bias (if any), dy           the inputs
  y, dx, dweight, dbias (if any)         torchao's output and gradients
  scale.x                                torchao's scale of x in the forward (for the cast test)

The rowwise recipes run with emulate=True: on the CPU, torch._scaled_mm takes tensorwise scales
only, and titan emulates there too (dequantized float8 values multiplied in fp32). The tensorwise
recipe runs torchao's real path (torch._scaled_mm). Test-only: the library never runs Python.
"""
import argparse
import dataclasses

import torch
from safetensors.torch import save_file
from torchao.float8 import Float8LinearConfig, convert_to_float8_training
from torchao.float8.float8_utils import tensor_to_scale
from torchao.float8.config import ScalingGranularity

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp"]


def case(recipe, dtype, bias, generator):
    x = torch.randn(2, 8, 64, generator=generator)
    x[0, 3, 5] = 40.0    # outliers: one row's amax far above the others
    x[1, 7, 60] = -25.0
    weight = torch.randn(48, 64, generator=generator) * 0.1
    weight[7, 11] = 3.0
    b = torch.randn(48, generator=generator) if bias else None
    dy = torch.randn(2, 8, 48, generator=generator) * 1e-3
    dy[1, 2, 30] = 0.5
    x, weight, dy = x.to(dtype), weight.to(dtype), dy.to(dtype)
    b = b.to(dtype) if b is not None else None

    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=bias, dtype=dtype))
    with torch.no_grad():
        model[0].weight.copy_(weight)
        if bias:
            model[0].bias.copy_(b)
    config = Float8LinearConfig.from_recipe_name(recipe)
    if recipe != "tensorwise":
        config = dataclasses.replace(config, emulate=True)
    convert_to_float8_training(model, config=config)
    xin = x.clone().requires_grad_(True)
    y = model(xin)
    y.backward(dy)

    granularity = ScalingGranularity.TENSORWISE if recipe == "tensorwise" else ScalingGranularity.AXISWISE
    scale_x = tensor_to_scale(x, torch.float8_e4m3fn, scaling_granularity=granularity,
                              axiswise_dim=None if recipe == "tensorwise" else -1,
                              round_scales_to_power_of_2=config.round_scales_to_power_of_2)
    out = {"x": x, "weight": weight, "dy": dy, "y": y.detach(), "dx": xin.grad,
           "dweight": model[0].weight.grad, "scale.x": scale_x}
    if bias:
        out["bias"] = b
        out["dbias"] = model[0].bias.grad
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    tensors = {}
    for recipe in RECIPES:
        for dtype_name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
            generator = torch.Generator().manual_seed(1234)
            bias = recipe == "tensorwise" and dtype == torch.float32
            for key, value in case(recipe, dtype, bias, generator).items():
                tensors[f"{recipe}.{dtype_name}.{key}"] = value.contiguous()
    save_file(tensors, args.out)


if __name__ == "__main__":
    main()
