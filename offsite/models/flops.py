"""FLOP count of a fine-tuning step, per token: forward, activation gradients and weight gradients.

Counts matrix multiplies only (2 FLOPs per multiply-add): every matmul module of a block (the registry says which), the LM
head, and attention's two score matmuls (QK^T and AV, full square, both operands' gradients in
the backward pass). Norms, activations and the embedding lookup are ignored.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from offsite.models.architectures import block_matmuls, num_blocks


def _matmul_macs(model, position: int) -> int:
    return sum(module.weight.numel() for module, _ in block_matmuls(model, [position]))


def block_costs(config, seq_len: int) -> tuple[float, float, float]:
    """(weight matmul FLOPs, attention score FLOPs, LM head FLOPs) per token, forward only."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 2 * 2 * seq_len * heads * head_dim
    head = (
        2 * model.get_output_embeddings().in_features * model.get_output_embeddings().out_features
    )
    return 2.0 * _matmul_macs(model, 0), float(attention), float(head)


def lora_costs(config, rank: int) -> float:
    """Forward FLOPs per token of rank-`rank` LoRA on every matmul of one block (x A then x B)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 2.0 * rank * sum(sum(m.weight.shape) for m, _ in block_matmuls(model, [0]))


def finetune_flops_per_token(
    config, *, emulator_depth: int, adapter_blocks: int, seq_len: int, lora_rank: int = 0
) -> dict[str, dict[str, float]]:
    """FLOPs per token of offsite fine-tuning (an emulator of `emulator_depth` blocks, of which
    `adapter_blocks` train), of the same with rank-`lora_rank` LoRA on every matmul of the adapter
    blocks instead (their own weights frozen: no weight gradients but LoRA's), and of full
    fine-tuning."""
    weights, attention, head = block_costs(config, seq_len)
    block_fwd = weights + attention
    lora = lora_costs(config, lora_rank) * adapter_blocks if lora_rank else 0.0

    def cost(depth: int, trained_weights: float, extra: float = 0.0) -> dict[str, float]:
        forward = depth * block_fwd + head + extra
        # dX for every matmul between the loss and the lowest trained block; attention: both operands
        activation = depth * (weights + 2 * attention) + head + extra
        return {"forward": forward, "activation_grad": activation, "weight_grad": trained_weights,
                "total": forward + activation + trained_weights}  # fmt: skip

    out = {
        "offsite": cost(emulator_depth, adapter_blocks * weights),
        "full": cost(num_blocks(config), num_blocks(config) * weights + head),
    }
    if lora_rank:
        out["offsite_lora"] = cost(emulator_depth, lora, extra=lora)
    return out
