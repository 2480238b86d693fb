"""Building the Hugging Face Mistral from a spec: source, quantization, attention, dtype, LoRA.

Plain functions, usable without a Trainer. ``validate_model_spec`` checks everything that can
be checked without weights (and so runs before any load); ``load_causal_lm`` loads them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from foundation import ConfigError, cache_folder, notify
from lightning_modules.fast_paths import (
    AdapterCompute,
    Checkpointing,
    Compile,
    Kernels,
    apply_activation_checkpointing,
    apply_liger_kernels,
    compile_layers,
    liger_available,
    resolve_kernels,
)
from lightning_modules.presets import PRESETS, preset_weights_folder
from lightning_modules.tokenizers import MISTRAL_V1_TOKENIZER

Quantization = Literal["none", "int8", "nf4", "nf4-dq"]
QuantStorage = Literal["uint8", "bfloat16", "float16", "float32"]
Attention = Literal["eager", "sdpa"]
DType = Literal["bfloat16", "float16", "float32"]

ALL_LINEAR_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """LoRA adapters through peft.

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Names (suffixes) of the linear layers that get adapters.
        compute: The dtype adapters multiply in over a 16-bit base: ``base-dtype`` (under autocast;
            weights, gradients and optimizer state stay float32), ``float32`` (peft's default: each
            adapter's input copied to float32), or ``auto`` (``base-dtype`` on a GPU, else ``float32``).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR_PROJECTIONS))
    compute: AdapterCompute = "auto"


@dataclass(frozen=True)
class InputRequirements:
    """What a model needs of the text fed to it; the CLI hands it from the model to the data.

    Args:
        tokenizer: The tokenizer matching the weights (a name, hub id or folder).
        max_positions: Longest sequence the model takes.
        vocab_size: Rows of the embedding: every token id must be below it.
    """

    tokenizer: str
    max_positions: int
    vocab_size: int


@dataclass
class ModelSpec:
    """Everything that decides which model is built.

    Args:
        source: A preset name (``tiny``, ``mistral-7b``), a hub id, or a local Hugging Face folder.
        preset_overrides: Config fields that replace a preset's (e.g. ``num_hidden_layers``).
        quantization: ``none``, ``int8`` (LLM.int8), ``nf4`` or ``nf4-dq`` (nf4, double quant).
        attention: Attention kernel: ``eager`` or ``sdpa``.
        dtype: Dtype of the non-quantized weights and of the 4-bit compute.
        activation_checkpointing: Recompute decoder layers in backward to save memory: ``off``,
            ``every-layer``, or ``selective`` (every ``checkpoint_every``-th layer).
        checkpoint_every: With ``selective``, checkpoint one layer in this many.
        keep_last_layers: With ``every-layer`` or ``selective``, this many of the last decoder layers keep
            their activations instead of recomputing them (memory traded for speed, layer by layer).
        kernels: Fused kernels: ``auto`` (Liger's RMSNorm, RoPE and SwiGLU on a CUDA GPU when
            ``liger-kernel`` is installed, unless the layers are compiled: the compiler fuses those
            itself), ``liger`` (insist), or ``off``.
        compile: ``layers`` compiles each decoder layer with ``torch.compile``; ``layers-cudagraphs`` also
            replays each as a CUDA graph, forward and backward (less host work per step). CUDA only;
            skipped on a CPU.
        quant_storage: The dtype 4-bit weights are packed in: ``uint8`` (bitsandbytes' default), or a
            floating-point one (``bfloat16``) so that FSDP can shard them with the rest.
        lora: LoRA adapters, or None for none (pure evaluation or full fine-tuning).
        preset_seed: Seed of a preset's random weights.
        cache_dir: Where preset weights are written; unset means the framework cache folder.
    """

    source: str = "tiny"
    preset_overrides: dict[str, int | float | bool | str | None] | None = None
    quantization: Quantization = "none"
    attention: Attention = "sdpa"
    dtype: DType = "bfloat16"
    activation_checkpointing: Checkpointing = "off"
    checkpoint_every: int = 2
    keep_last_layers: int = 0
    kernels: Kernels = "auto"
    compile: Compile = "off"
    quant_storage: QuantStorage = "uint8"
    lora: LoraSettings | None = None
    preset_seed: int = 0
    cache_dir: str | None = None

    @property
    def is_preset(self) -> bool:
        return self.source in PRESETS

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def tokenizer_source(self) -> str:
        """The tokenizer matching the weights: the checkpoint's own, or Mistral v1 for presets."""
        return MISTRAL_V1_TOKENIZER if self.is_preset else self.source

    def describe(self) -> dict[str, object]:
        """Flat, JSON-friendly summary for logs and reports."""
        summary = dataclasses.asdict(self)
        summary["lora"] = dataclasses.asdict(self.lora) if self.lora else None
        return summary


def _check_choice(name: str, value: str, literal) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ConfigError(f"model.{name}={value!r} is not supported; choose one of {list(allowed)}.")


def resolve_model_config(source: str, preset_overrides: dict | None = None):
    """The model's config, from a preset (plus overrides) or a checkpoint; loads no weights."""
    from transformers import AutoConfig, MistralConfig

    if source in PRESETS:
        fields = dict(PRESETS[source])
        unknown = sorted(set(preset_overrides or {}) - set(MistralConfig().to_dict()))
        if unknown:
            raise ConfigError(
                f"model.preset_overrides has unknown MistralConfig fields {unknown}; "
                "use field names such as num_hidden_layers, hidden_size, max_position_embeddings."
            )
        fields.update(preset_overrides or {})
        return MistralConfig(**fields)
    if preset_overrides:
        raise ConfigError(
            "model.preset_overrides only applies to presets "
            f"({', '.join(PRESETS)}); remove it when model.source is a checkpoint."
        )
    looks_like_hub_id = source.count("/") == 1 and not os.path.exists(source)
    if not Path(source).expanduser().is_dir() and not looks_like_hub_id:
        raise ConfigError(
            f"model.source={source!r} is not a preset ({', '.join(PRESETS)}), an existing folder, "
            "or a hub id of the form 'org/name'; fix model.source."
        )
    try:
        location = str(Path(source).expanduser()) if not looks_like_hub_id else source
        return AutoConfig.from_pretrained(location, trust_remote_code=False)  # never runs a repository's code
    except OSError as error:
        raise ConfigError(
            f"Could not read the config of model.source={source!r} ({error}). Give a local "
            "Hugging Face folder or a hub id reachable from this machine, or a preset "
            f"({', '.join(PRESETS)})."
        ) from None


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype, quant_storage: str = "uint8"):
    """transformers' ``BitsAndBytesConfig`` for a quantization name, or None for ``none``."""
    from transformers import BitsAndBytesConfig

    _check_choice("quantization", quantization, Quantization)
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quantization == "nf4-dq",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, quant_storage),
    )


def linear_module_names(config) -> list[str]:
    """Names of every ``nn.Linear`` in the model, found on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]


def check_lora_targets(config, lora: LoraSettings) -> None:
    """Raise if a LoRA target matches no linear layer of the model."""
    if lora.r < 1:
        raise ConfigError(f"model.lora.r must be >= 1, got {lora.r}.")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}.")
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules is empty; name at least one linear layer.")
    _check_choice("lora.compute", lora.compute, AdapterCompute)
    names = linear_module_names(config)
    unmatched = [
        target
        for target in lora.target_modules
        if not any(name == target or name.endswith("." + target) for name in names)
    ]
    if unmatched:
        available = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise ConfigError(f"model.lora.target_modules {unmatched} match no linear layer; choose among {available}.")


def validate_model_spec(spec: ModelSpec):
    """Check a spec without loading weights and return the model config it resolves to."""
    _check_choice("quantization", spec.quantization, Quantization)
    _check_choice("attention", spec.attention, Attention)
    _check_choice("dtype", spec.dtype, DType)
    _check_choice("activation_checkpointing", spec.activation_checkpointing, Checkpointing)
    _check_choice("kernels", spec.kernels, Kernels)
    _check_choice("compile", spec.compile, Compile)
    _check_choice("quant_storage", spec.quant_storage, QuantStorage)
    if spec.checkpoint_every < 1:
        raise ConfigError(f"model.checkpoint_every must be >= 1, got {spec.checkpoint_every}.")
    if spec.keep_last_layers < 0:
        raise ConfigError(f"model.keep_last_layers must be >= 0, got {spec.keep_last_layers}.")
    if spec.compile == "layers-cudagraphs" and spec.activation_checkpointing != "off":
        raise ConfigError(
            "model.compile=layers-cudagraphs cannot recompute checkpointed layers (the replayed graphs "
            "overwrite the outputs that recomputation needs); set model.compile: layers, or "
            "model.activation_checkpointing: off."
        )
    if spec.kernels == "liger" and not liger_available():
        raise ConfigError(
            "model.kernels=liger needs a CUDA GPU and liger-kernel (pip install 'scaling-smarter[gpu]'); "
            "set model.kernels: auto (Liger where it runs) or off."
        )
    if spec.quantization != "none" and spec.dtype == "float32":
        raise ConfigError(
            f"model.quantization={spec.quantization} computes in 16-bit; set model.dtype to bfloat16 or float16."
        )
    config = resolve_model_config(spec.source, spec.preset_overrides)
    if spec.lora is not None:
        check_lora_targets(config, spec.lora)
    return config


def apply_lora(model, lora: LoraSettings):
    """Wrap ``model`` with peft LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def cache_root(spec: ModelSpec) -> Path:
    return cache_folder(spec.cache_dir)


def disable_bnb_cpu_weight_repacking(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-bf16 CPU kernel.

    That repacking happens on the first no-grad forward, and ``state_dict()`` undoes it in
    place with bf16-rounded scales, so after a checkpoint save the live model computes
    something else (bitsandbytes 0.50, CPU only). Without it, CPU 4-bit is slower but stable.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare_preset_weights(spec: ModelSpec, device: torch.device | str = "cpu") -> Path | None:
    """Write a preset's random weights once (a one-time cost kept out of load timings)."""
    if not spec.is_preset:
        return None
    config = validate_model_spec(spec)
    return preset_weights_folder(config, spec.preset_seed, cache_root(spec), torch.device(device))


def load_causal_lm(spec: ModelSpec, device: torch.device | str = "cpu"):
    """Build the model a spec describes, weights loaded straight onto ``device``.

    Presets get random weights written once to a cache folder, then load like any checkpoint.
    """
    from transformers import AutoModelForCausalLM

    config = validate_model_spec(spec)
    device = torch.device(device)
    if spec.quantization != "none" and device.type not in ("cuda", "cpu", "xpu"):
        raise ConfigError(f"bitsandbytes quantization does not run on {device.type}; use a GPU or CPU.")
    if spec.is_preset:
        weights = preset_weights_folder(config, spec.preset_seed, cache_root(spec), device)
    else:
        weights = Path(spec.source).expanduser() if Path(spec.source).expanduser().is_dir() else spec.source
    model = AutoModelForCausalLM.from_pretrained(
        weights,
        config=config,
        dtype=spec.torch_dtype,
        attn_implementation=spec.attention,
        quantization_config=bitsandbytes_config(spec.quantization, spec.torch_dtype, spec.quant_storage),
        device_map={"": device},
    )
    if spec.quantization in ("nf4", "nf4-dq") and device.type == "cpu":
        disable_bnb_cpu_weight_repacking(model)
    if resolve_kernels(spec.kernels, device, spec.compile) == "liger":
        apply_liger_kernels(model)
    apply_activation_checkpointing(model, spec.activation_checkpointing, spec.checkpoint_every, spec.keep_last_layers)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    if spec.compile != "off":
        if device.type == "cuda":
            compile_layers(model, cuda_graphs=spec.compile == "layers-cudagraphs")
        else:
            notify(f"model.compile={spec.compile} is skipped on a CPU (it speeds up CUDA kernels only).")
    return model
