"""Reference results of transformers' MoE blocks for test_moe.cpp.

Three blocks with tiny configurations, run forward and backward in float32 on fixed tensors:
  mixtral   MixtralSparseMoeBlock: 4 experts, top-2, softmax, renormalised top-k weights
  qwen3     Qwen3MoeSparseMoeBlock: 8 experts, top-2, softmax, norm_topk_prob=False
  deepseek  DeepseekV3MoE: 8 experts in 4 groups, the best 2 groups, top-2, sigmoid scores with a
            correction bias that only chooses, renormalised, routed_scaling_factor 2.5, one shared
            expert (also written: bias [E], shared_w1, shared_w2, shared_w3 and their gradients)
The input is positive and the router row of the last expert is negative, so that expert receives
no token (its weights must get a zero gradient). The Mixtral and Qwen3-MoE blocks run again in
bfloat16 on the same values rounded to it ("<name>_bf16.": no aux), and so does a Qwen3-MoE block
choosing top-4 ("qwen3_top4_bf16."; with two terms a bf16 sum is rounded once anyway), in
transformers' own bf16
arithmetic (Qwen3-MoE casts the routing weights to bf16 and weighs in bf16, Mixtral weighs in
fp32; the weighted outputs are summed in bf16, one index_add_ per expert). Written to --out
(safetensors), per block "<name>.":
  x [2, 5, 16], dy [2, 5, 16], gate [E, 16], w1, w3 [E, 32, 16], w2 [E, 16, 32]   the inputs
  y, dx, dgate, dw1, dw2, dw3                                                     the results
  y_fp32_sum (bf16 blocks)   the same weighted outputs of transformers' experts, each token's
                             summed in fp32 and rounded once (titan's combine) instead
  aux, daux_gate     load_balancing_loss_func over the block's router logits, and its gradient
                     with respect to the router weight
transformers 5 stores the experts fused: gate_up_proj [E, 64, 16] = [w1 | w3] along dim 1,
down_proj [E, 16, 32] = w2. Test-only: the library never runs Python.
"""
import argparse

import torch
from torch.overrides import TorchFunctionMode
from safetensors.torch import save_file
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

DIM, HIDDEN, TOP_K = 16, 32, 2


def block_of(name, top_k=TOP_K):
    if name == "mixtral":
        config = MixtralConfig(hidden_size=DIM, intermediate_size=HIDDEN, num_local_experts=4,
                               num_experts_per_tok=TOP_K, router_jitter_noise=0.0)
        return MixtralSparseMoeBlock(config), 4
    if name == "qwen3":
        config = Qwen3MoeConfig(hidden_size=DIM, moe_intermediate_size=HIDDEN, num_experts=8,
                                num_experts_per_tok=top_k, norm_topk_prob=False)
        return Qwen3MoeSparseMoeBlock(config), 8
    config = DeepseekV3Config(hidden_size=DIM, moe_intermediate_size=HIDDEN, n_routed_experts=8,
                              num_experts_per_tok=TOP_K, n_group=4, topk_group=2, n_shared_experts=1,
                              routed_scaling_factor=2.5, norm_topk_prob=True)
    return DeepseekV3MoE(config), 8


class SumInFp32(TorchFunctionMode):
    """Records what the experts add into their output with index_add_ (and lets them add it), so
    that the same weighted outputs can be summed per token in fp32."""

    def __init__(self):
        super().__init__()
        self.sum = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.index_add_:
            out, dim, index, source = args
            assert dim == 0 and not kwargs, "transformers' experts add rows along dim 0"
            if self.sum is None:
                self.sum = torch.zeros(out.shape, dtype=torch.float32)
            self.sum.index_add_(0, index, source.detach().float())
        return func(*args, **kwargs)


def case(name, generator, dtype=torch.float32, top_k=TOP_K):
    block, experts = block_of(name, top_k)
    block.to(dtype)
    block.train()
    x = torch.rand(2, 5, DIM, generator=generator) + 0.1  # positive: the last expert never wins
    gate = torch.randn(experts, DIM, generator=generator) * 0.5
    gate[-1] = -1.0
    w1 = torch.randn(experts, HIDDEN, DIM, generator=generator) * 0.2
    w3 = torch.randn(experts, HIDDEN, DIM, generator=generator) * 0.2
    w2 = torch.randn(experts, DIM, HIDDEN, generator=generator) * 0.2
    dy = torch.randn(2, 5, DIM, generator=generator)
    shared = name == "deepseek"
    if shared:
        bias = torch.randn(experts, generator=generator) * 0.1
        shared_w = [torch.randn(HIDDEN, DIM, generator=generator) * 0.2,
                    torch.randn(DIM, HIDDEN, generator=generator) * 0.2,
                    torch.randn(HIDDEN, DIM, generator=generator) * 0.2]
    with torch.no_grad():
        block.gate.weight.copy_(gate)
        block.experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
        block.experts.down_proj.copy_(w2)
        if shared:
            block.gate.e_score_correction_bias.copy_(bias)
            block.shared_experts.gate_proj.weight.copy_(shared_w[0])
            block.shared_experts.down_proj.weight.copy_(shared_w[1])
            block.shared_experts.up_proj.weight.copy_(shared_w[2])
    x, dy = x.to(dtype), dy.to(dtype)
    xin = x.clone().requires_grad_(True)
    with SumInFp32() as summed:
        y = block(xin)
    y.backward(dy)
    gate_up = block.experts.gate_up_proj.grad
    out = {"x": x, "dy": dy, "gate": gate, "w1": w1, "w2": w2, "w3": w3, "y": y.detach(), "dx": xin.grad,
           "dgate": block.gate.weight.grad, "dw1": gate_up[:, :HIDDEN], "dw3": gate_up[:, HIDDEN:],
           "dw2": block.experts.down_proj.grad}
    if shared:
        out.update({"bias": bias, "shared_w1": shared_w[0], "shared_w2": shared_w[1], "shared_w3": shared_w[2],
                    "dshared_w1": block.shared_experts.gate_proj.weight.grad,
                    "dshared_w2": block.shared_experts.down_proj.weight.grad,
                    "dshared_w3": block.shared_experts.up_proj.weight.grad})
    if not shared:  # DeepSeek's sigmoid scores with a bias may still choose it
        assert out["dw1"][-1].abs().max() == 0, "the last expert received a token"
    if dtype != torch.float32:
        exact = summed.sum.double()
        assert torch.equal(summed.sum, exact.float()), "the fp32 sums are exact, whatever their order"
        out["y_fp32_sum"] = summed.sum.to(dtype).reshape(y.shape)
        out.update(gate=block.gate.weight.detach(), w1=block.experts.gate_up_proj.detach()[:, :HIDDEN],
                   w3=block.experts.gate_up_proj.detach()[:, HIDDEN:], w2=block.experts.down_proj.detach())
        label = name if top_k == TOP_K else f"{name}_top{top_k}"
        return {f"{label}_bf16.{key}": value.contiguous() for key, value in out.items()}
    router = gate.clone().requires_grad_(True)
    aux = load_balancing_loss_func((torch.nn.functional.linear(x.reshape(-1, DIM), router),), experts, TOP_K)
    aux.backward()
    out["aux"] = aux.detach().reshape(1)
    out["daux_gate"] = router.grad
    return {f"{name}.{key}": value.contiguous() for key, value in out.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name in ("mixtral", "qwen3", "deepseek"):
        tensors.update(case(name, generator))
    for name in ("mixtral", "qwen3"):
        tensors.update(case(name, generator, torch.bfloat16))
    tensors.update(case("qwen3", generator, torch.bfloat16, top_k=4))
    save_file(tensors, args.out)


if __name__ == "__main__":
    main()
