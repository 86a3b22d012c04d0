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


def finetune_flops_per_token(
    config, *, emulator_depth: int, adapter_blocks: int, seq_len: int
) -> dict[str, dict[str, float]]:
    """FLOPs per token of offsite fine-tuning (an emulator of `emulator_depth` blocks, of which
    `adapter_blocks` train) and of full fine-tuning."""
    weights, attention, head = block_costs(config, seq_len)
    block_fwd = weights + attention

    def cost(depth: int, trained_blocks: int, head_trained: bool) -> dict[str, float]:
        forward = depth * block_fwd + head
        # dX for every matmul between the loss and the lowest trained block; attention: both operands
        activation = depth * (weights + 2 * attention) + head
        weight = trained_blocks * weights + (head if head_trained else 0.0)
        return {"forward": forward, "activation_grad": activation, "weight_grad": weight,
                "total": forward + activation + weight}  # fmt: skip

    return {
        "offsite": cost(emulator_depth, adapter_blocks, head_trained=False),
        "full": cost(num_blocks(config), num_blocks(config), head_trained=True),
    }
