"""Distributed strategies with this framework's defaults (a trainer add-on, chosen in YAML).

``MistralFSDPStrategy`` is Lightning's FSDP set up for a Mistral with LoRA, the base quantized or not:
each decoder layer is its own FSDP unit, original parameters are kept (frozen base and trainable
adapters share units), and checkpoints are gathered whole on the first process (the module then
keeps only the adapters). A 4-bit base needs ``model.quant_storage: bfloat16``: FSDP shards
floating-point tensors, and bitsandbytes recovers each layer's quantization state after gathering.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy


def _decoder_layer_classes() -> set[type]:
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    return {MistralDecoderLayer}


class MistralFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` wrapping each Mistral decoder layer, for LoRA and QLoRA.

    Args:
        sharding_strategy: ``FULL_SHARD`` (weights, gradients and optimizer state split across
            processes), ``SHARD_GRAD_OP`` or ``HYBRID_SHARD`` (full shards within a machine).
        **kwargs: Anything else ``FSDPStrategy`` takes.
    """

    def __init__(self, sharding_strategy: str = "FULL_SHARD", **kwargs: Any) -> None:
        kwargs.setdefault("auto_wrap_policy", _decoder_layer_classes())
        kwargs.setdefault("use_orig_params", True)
        kwargs.setdefault("state_dict_type", "full")
        super().__init__(sharding_strategy=sharding_strategy, **kwargs)
