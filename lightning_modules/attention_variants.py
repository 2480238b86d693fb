"""Variants added by subclassing: the model with SDPA pinned to one kernel backend.

``attention: sdpa`` lets PyTorch pick the SDPA kernel (flash, memory-efficient, cuDNN or math) per
call. ``PinnedSdpaModule`` pins one, to compare the kernels themselves. It shows the extension
pattern: register an attention function with transformers' ``AttentionInterface`` and switch the
built model to it in ``build_model``; every stage, the study's probe included, then uses it.

    smarter validate -c configs/variants/bf16-sdpa.yaml \\
        --model lightning_modules.attention_variants.PinnedSdpaModule --model.sdpa_backend efficient
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from foundation import ConfigError
from lightning_modules.mistral_module import MistralModule

SdpaBackend = Literal["math", "efficient", "flash", "cudnn"]
_BACKENDS = {
    "math": SDPBackend.MATH,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def register_pinned_sdpa(backend: str) -> str:
    """Register (once) an attention function that runs SDPA on ``backend``; return its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = f"sdpa_{backend}"
    kernel = _BACKENDS[backend]

    def pinned_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
        with sdpa_kernel(kernel):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, pinned_sdpa_attention)
    AttentionMaskInterface.register(name, sdpa_mask)  # the masks SDPA takes (a name without one gets no mask)
    return name


class PinnedSdpaModule(MistralModule):
    """``MistralModule`` with SDPA pinned to one kernel backend.

    Args:
        sdpa_backend: ``math``, ``efficient`` (memory-efficient), ``flash`` or ``cudnn``.
        **kwargs: Everything ``MistralModule`` takes (``attention`` must stay ``sdpa``).
    """

    def __init__(self, sdpa_backend: SdpaBackend = "math", **kwargs) -> None:
        if kwargs.get("attention", "sdpa") != "sdpa":
            raise ConfigError("PinnedSdpaModule pins an SDPA backend; set model.attention: sdpa.")
        if sdpa_backend not in _BACKENDS:
            raise ConfigError(f"model.sdpa_backend={sdpa_backend!r}; choose one of {sorted(_BACKENDS)}.")
        super().__init__(**kwargs)
        self.sdpa_backend = sdpa_backend

    def build_model(self, device: torch.device) -> torch.nn.Module:
        model = super().build_model(device)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation(register_pinned_sdpa(self.sdpa_backend))
        return model
