"""The LightningModule wrapping a configurable Mistral, and the functions that build it."""

from lightning_modules.mistral_module import MistralModule
from lightning_modules.model_building import LoraSettings, ModelSpec, load_causal_lm

__all__ = ["LoraSettings", "MistralModule", "ModelSpec", "load_causal_lm"]
