"""Reference checkpoints and outputs for test_models' parity suite, made with transformers.

For each of eight tiny random models (Llama 2 shape with full multi-head attention, Llama 3.1 with
GQA and rope_type "llama3" scaling, Mistral with a sliding window shorter than the sequence,
Mixtral with 8 experts, top-2 and the auxiliary loss in its loss, Qwen3-MoE with q/k norms, an
explicit head_dim and norm_topk_prob = False, dense Qwen3 with q/k norms and an explicit head_dim,
Llama 3.2 with the output tied to the embedding and RoPE scaled by 32, Qwen2 with random q/k/v
biases) this writes, under --out/<name>/:
  config.json + model.safetensors          the model, by save_pretrained (fp32)
  sharded/ (llama31 only)                  the same model saved in several files with an index
  reference.safetensors                    input_ids [2, S], logits [2, S, V], loss [], inv_freq,
                                           and grad.<hf parameter name> for every parameter as
                                           save_pretrained names it (one per expert), plus
                                           aux_loss [] for Mixtral
In the MoE models every router has rows v, -v, u, -u and a zero last row: each token has two
positive logits, so the last expert receives no token (its weights' gradients must be zero).
plus --out/dtypes.safetensors, written by the safetensors package: arange(-6, 6).reshape(3, 4) in
every dtype titan reads (U8: arange(12), BOOL: > 0).

Runs offline on CPU in a few seconds; test-only (the library never runs Python).
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=251, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
              initializer_range=0.1)

CASES = {
    "llama2": (LlamaConfig, LlamaForCausalLM, 20,
               dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama31": (LlamaConfig, LlamaForCausalLM, 20,
                dict(num_key_value_heads=2,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      # small, so that the scaling changes the frequencies used here
                                      "original_max_position_embeddings": 32})),
    "mistral": (MistralConfig, MistralForCausalLM, 24,
                dict(num_key_value_heads=2, sliding_window=8,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "mixtral": (MixtralConfig, MixtralForCausalLM, 20,
                dict(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0,
                     output_router_logits=True, router_aux_loss_coef=0.1,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, 20,
                  dict(num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=48, norm_topk_prob=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, 20,
              dict(num_key_value_heads=2, head_dim=24,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama32": (LlamaConfig, LlamaForCausalLM, 20,
                dict(num_key_value_heads=2, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32})),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, 20,
              dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
MOE = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def disk_grads(name, model):
    """Every parameter's gradient under its on-disk name: transformers 5 keeps a MoE's experts fused
    in memory (gate_up_proj [E, 2h, dim] = [w1 | w3], down_proj [E, dim, h]); save_pretrained
    writes one tensor per expert."""
    grads = {}
    for pname, p in model.named_parameters():
        grad = p.grad.contiguous()
        if name not in MOE or ".mlp." not in pname:
            grads[pname] = grad
            continue
        block, gate, up, down = MOE[name]
        prefix = pname.split(".mlp.")[0] + "." + block + "."
        if pname.endswith("mlp.gate.weight"):
            grads[prefix + "gate.weight"] = grad
        elif pname.endswith("experts.gate_up_proj"):
            hidden = grad.shape[1] // 2
            for j in range(grad.shape[0]):
                grads[f"{prefix}experts.{j}.{gate}.weight"] = grad[j, :hidden].contiguous()
                grads[f"{prefix}experts.{j}.{up}.weight"] = grad[j, hidden:].contiguous()
        elif pname.endswith("experts.down_proj"):
            for j in range(grad.shape[0]):
                grads[f"{prefix}experts.{j}.{down}.weight"] = grad[j].contiguous()
        else:
            raise ValueError(f"unexpected MoE parameter {pname}")
    return grads


def make_case(name, out, seed):
    config_cls, model_cls, seq, extra = CASES[name]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    model = model_cls(config).float()
    with torch.no_grad():  # non-trivial norm weights
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            if pname.endswith(".bias"):  # Qwen2's q/k/v biases (transformers initialises them to 0)
                p.copy_(0.2 * torch.randn_like(p))
            if pname.endswith("mlp.gate.weight"):  # the last expert never wins (see the top)
                v, u = torch.randn(p.shape[1]), torch.randn(p.shape[1])
                p[0], p[1], p[2], p[3], p[-1] = v, -v, u, -u, 0
    directory = os.path.join(out, name)
    model.save_pretrained(directory, safe_serialization=True)
    if name == "llama31":
        model.save_pretrained(os.path.join(directory, "sharded"), safe_serialization=True, max_shard_size="60KB")

    ids = torch.randint(0, config.vocab_size, (2, seq))
    result = model(input_ids=ids, labels=ids)
    result.loss.backward()
    tensors = {"input_ids": ids, "logits": result.logits.detach().contiguous(),
               "loss": result.loss.detach().reshape(()), "inv_freq": model.model.rotary_emb.inv_freq.clone()}
    if getattr(result, "aux_loss", None) is not None:
        tensors["aux_loss"] = result.aux_loss.detach().reshape(())
    for pname, grad in disk_grads(name, model).items():
        tensors["grad." + pname] = grad
    save_file(tensors, os.path.join(directory, "reference.safetensors"))


def make_dtypes(out):
    base = torch.arange(-6, 6, dtype=torch.float64).reshape(3, 4)
    tensors = {name: base.to(dtype) for name, dtype in [
        ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
        ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8)]}
    tensors["U8"] = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    tensors["BOOL"] = base > 0
    save_file(tensors, os.path.join(out, "dtypes.safetensors"), metadata={"format": "pt"})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for seed, name in enumerate(CASES):
        make_case(name, args.out, seed)
    make_dtypes(args.out)


if __name__ == "__main__":
    main()
