"""Distributed strategies with this framework's defaults (a trainer add-on, chosen in YAML).

``MistralFSDPStrategy`` is Lightning's FSDP set up for a Mistral with LoRA, the base quantized or not:
each decoder layer is its own FSDP unit, and so is each trainable adapter matrix, so that a layer's
unit holds only frozen weights and FSDP allocates no gradient for them (in a shared unit it would,
for the whole flat parameter; torch warns of it). On a 7B QLoRA over 2 H200s this did not lower the
peak per GPU, which something else sets (BENCHMARKS.md). Original parameters are kept, and
checkpoints are gathered whole on the first process (the module then keeps only the adapters).
A 4-bit base needs ``model.quant_storage: bfloat16``: FSDP shards
floating-point tensors, and bitsandbytes recovers each layer's quantization state after gathering.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy


def decoder_layers_and_trainable_leaves(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP wrap policy: a unit for each Mistral decoder layer and for each module without children whose
    own weights train (the LoRA matrices), so that frozen and trainable weights never share a unit."""
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    if recurse:
        return True
    if isinstance(module, MistralDecoderLayer):
        return True
    has_children = next(module.children(), None) is not None
    return not has_children and any(p.requires_grad for p in module.parameters(recurse=False))


class MistralFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` wrapping each Mistral decoder layer, for LoRA and QLoRA.

    Args:
        sharding_strategy: ``FULL_SHARD`` (weights, gradients and optimizer state split across
            processes), ``SHARD_GRAD_OP`` or ``HYBRID_SHARD`` (full shards within a machine).
        **kwargs: Anything else ``FSDPStrategy`` takes.
    """

    def __init__(self, sharding_strategy: str = "FULL_SHARD", **kwargs: Any) -> None:
        kwargs.setdefault("auto_wrap_policy", decoder_layers_and_trainable_leaves)
        kwargs.setdefault("use_orig_params", True)
        kwargs.setdefault("state_dict_type", "full")
        super().__init__(sharding_strategy=sharding_strategy, **kwargs)
