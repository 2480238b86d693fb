"""The model side: the LightningModule wrapping a configurable Mistral, the functions that build it,
its tokenizer, and the measuring helpers the study and the benchmarks share."""

from lightning_modules.export import export_trained_model
from lightning_modules.mistral_module import MistralModule, load_trained
from lightning_modules.model_building import InputRequirements, LoraSettings, ModelSpec, load_causal_lm
from lightning_modules.tokenizers import MISTRAL_V1_TOKENIZER, TextTokenizer, load_tokenizer

__all__ = [
    "MISTRAL_V1_TOKENIZER",
    "InputRequirements",
    "LoraSettings",
    "MistralModule",
    "ModelSpec",
    "TextTokenizer",
    "export_trained_model",
    "load_causal_lm",
    "load_tokenizer",
    "load_trained",
]
