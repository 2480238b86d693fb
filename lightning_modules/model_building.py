"""Building the Hugging Face Mistral from a spec: source, quantization, attention, dtype, LoRA.

Plain functions, usable without a Trainer. ``validate_model_spec`` checks everything that can
be checked without weights (and so runs before any load); ``load_causal_lm`` loads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from foundation import CACHE_FOLDER_SETTING, ConfigError, cache_folder, check_writable_folder, notify
from lightning_modules.execution_plan import ExecutionPlan, Platform, resolve_plan
from lightning_modules.fast_paths import (
    AdapterCompute,
    Checkpointing,
    Compile,
    Kernels,
    apply_activation_checkpointing,
    apply_liger_kernels,
    compile_layers,
    offload_checkpointed_layers,
)
from lightning_modules.presets import PRESETS, preset_weights_folder
from lightning_modules.tokenizers import MISTRAL_V1_TOKENIZER

Quantization = Literal["none", "int8", "nf4", "nf4-dq"]
QuantStorage = Literal["uint8", "bfloat16", "float16", "float32"]
Attention = Literal["eager", "sdpa"]
DType = Literal["bfloat16", "float16", "float32"]

ALL_LINEAR_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIG_FILE = "adapter_config.json"
# written beside every export (lightning_modules.export): what the folder is and which base it belongs to
PROVENANCE_FILE = "smarter_export.json"


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

    @classmethod
    def from_value(cls, value: LoraSettings | dict | None) -> LoraSettings | None:
        """Settings as given: an instance, None, or the plain dict that a checkpoint's hyperparameters hold
        when the CLI built the module (LightningCLI saves dataclass arguments as dicts)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ConfigError(f"model.lora has unknown fields {unknown}; see `smarter fit --model.help`.")
            return cls(**value)
        raise ConfigError(f"model.lora must be a mapping of LoRA settings or null, got {value!r}.")


@dataclass(frozen=True)
class AdapterFolder:
    """A PEFT adapter folder given as ``model.source``: the base it was trained on and its LoRA shape.

    Args:
        folder: The folder (``adapter_config.json`` and the adapter's weights).
        base: The base model: a preset name, a Hugging Face folder or a hub id.
        preset_seed: The seed of a preset base's weights.
        preset_overrides: The config fields a preset base was built with.
        r: The adapter's rank.
        alpha: Its scaling numerator.
        target_modules: The layers it adapts.
    """

    folder: Path
    base: str
    preset_seed: int
    preset_overrides: dict | None
    r: int
    alpha: int
    target_modules: tuple[str, ...]

    @property
    def has_tokenizer(self) -> bool:
        return any((self.folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def read_adapter_folder(source: str) -> AdapterFolder | None:
    """The adapter that ``source`` names, or None when it is not a folder holding ``adapter_config.json``.

    A folder that ``smarter`` exported says which preset weights (seed, overrides) its base has in
    ``smarter_export.json``; any other PEFT folder must name a base that is not a preset.
    """
    folder = Path(source).expanduser()
    config_file = folder / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        provenance_file = folder / PROVENANCE_FILE
        provenance = json.loads(provenance_file.read_text(encoding="utf-8")) if provenance_file.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"model.source={source!r} looks like a PEFT adapter but its files cannot be read ({error}); "
            "give an adapter folder that `smarter fit` or `smarter export` wrote."
        ) from None
    if config.get("peft_type", "LORA") != "LORA" or not config.get("base_model_name_or_path"):
        raise ConfigError(
            f"model.source={source!r} holds a {config.get('peft_type')} adapter without a base model name; "
            "only LoRA adapters that name their base can be a model.source."
        )
    base_info = provenance.get("base") or {}
    base = str(base_info.get("preset") or config["base_model_name_or_path"])
    if base in PRESETS and not base_info:
        raise ConfigError(
            f"model.source={source!r} is an adapter for the preset {base!r}, but it has no {PROVENANCE_FILE} "
            "saying which random weights (seed, overrides) it was trained on; give a folder that smarter exported."
        )
    targets = config.get("target_modules") or []
    return AdapterFolder(
        folder=folder,
        base=base,
        preset_seed=int(base_info.get("preset_seed") or 0),
        preset_overrides=base_info.get("preset_overrides"),
        r=int(config.get("r", 8)),
        alpha=int(config.get("lora_alpha", 8)),
        target_modules=tuple(sorted([targets] if isinstance(targets, str) else targets)),
    )


@dataclass(frozen=True)
class InputRequirements:
    """What a model needs of the text fed to it; the CLI hands it from the model to the data.

    Args:
        tokenizer: The tokenizer matching the weights (a name, hub id or folder).
        max_positions: Longest sequence the model takes.
        vocab_size: Rows of the embedding: every token id must be below it.
        fixed_batch_shape: Every training batch must have the same shape (compiled layers: a new shape
            compiles and captures again, seconds of a step), so a last short batch is filled with padding rows.
    """

    tokenizer: str
    max_positions: int
    vocab_size: int
    fixed_batch_shape: bool = False


@dataclass
class ModelSpec:
    """Everything that decides which model is built.

    Args:
        source: A preset name (``tiny``, ``mistral-7b``), a hub id, a local Hugging Face folder, or a LoRA
            adapter folder (``smarter``'s ``export/adapter``, or any PEFT folder that names its base): the
            adapter is loaded onto its base, trainable when ``lora`` has its shape, frozen when ``lora`` is null.
        preset_overrides: Config fields that replace a preset's (e.g. ``num_hidden_layers``).
        quantization: ``none``, ``int8`` (LLM.int8), ``nf4`` or ``nf4-dq`` (nf4, double quant).
        attention: Attention kernel: ``eager`` or ``sdpa``.
        dtype: Dtype of the non-quantized weights and of the 4-bit compute.
        activation_checkpointing: Recompute decoder layers in backward to save memory: ``off``,
            ``every-layer``, ``selective`` (every ``checkpoint_every``-th layer), or ``offload`` (every layer,
            each layer's input kept in pinned host memory instead of on the GPU, copied on a side stream).
        checkpoint_every: With ``selective``, checkpoint one layer in this many.
        keep_last_layers: With ``every-layer``, ``selective`` or ``offload``, this many of the last decoder layers keep
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

    def __post_init__(self) -> None:
        self.lora = LoraSettings.from_value(self.lora)

    @property
    def adapter(self) -> AdapterFolder | None:
        """The adapter that ``source`` names, or None when ``source`` is a model."""
        return read_adapter_folder(self.source)

    @property
    def base_source(self) -> str:
        """Where the base weights come from: ``source``, or the base an adapter source was trained on."""
        adapter = self.adapter
        return adapter.base if adapter else self.source

    @property
    def base_preset_settings(self) -> tuple[int, dict | None]:
        """(seed, overrides) of a preset base: the configured ones, or those an adapter source was trained on."""
        adapter = self.adapter
        return (adapter.preset_seed, adapter.preset_overrides) if adapter else (self.preset_seed, self.preset_overrides)

    @property
    def is_preset(self) -> bool:
        """Whether the base weights are a random-weight preset."""
        return self.base_source in PRESETS

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def tokenizer_source(self) -> str:
        """The tokenizer matching the weights: Mistral v1 for presets, else the checkpoint's own (an adapter
        folder's copy where it holds one)."""
        if self.is_preset:
            return MISTRAL_V1_TOKENIZER
        adapter = self.adapter
        return str(adapter.folder) if adapter and adapter.has_tokenizer else self.base_source

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
    folder = Path(source).expanduser()
    looks_like_hub_id = source.count("/") == 1 and not os.path.exists(source) and not source.startswith((".", "~"))
    if folder.is_file():
        hint = " (a checkpoint is given with --ckpt_path)" if folder.suffix == ".ckpt" else ""
        raise ConfigError(
            f"model.source={source!r} is a file; give a Hugging Face model folder (config.json and weights), "
            f"a LoRA adapter folder, a hub id or a preset ({', '.join(PRESETS)}){hint}."
        )
    if folder.is_dir() and not (folder / "config.json").is_file():
        inside = sorted(path.name for path in folder.iterdir())[:4]
        raise ConfigError(
            f"model.source={source!r} is a folder without a model: no config.json (nor adapter_config.json) in it "
            f"({'holds ' + ', '.join(inside) if inside else 'it is empty'}); give the folder that smarter exported "
            "(export/model, export/merged or export/adapter) or another Hugging Face model folder."
        )
    if not folder.is_dir() and not looks_like_hub_id:
        raise ConfigError(
            f"model.source={source!r} is not a preset ({', '.join(PRESETS)}), an existing folder, "
            "or a hub id of the form 'org/name'; fix model.source."
        )
    if looks_like_hub_id:
        check_hub_model_available(source)
    try:
        location = str(folder) if not looks_like_hub_id else source
        return AutoConfig.from_pretrained(location, trust_remote_code=False)  # never runs a repository's code
    except OSError as error:
        raise ConfigError(
            f"Could not read the config of model.source={source!r} ({error}). Give a local "
            "Hugging Face folder or a hub id reachable from this machine, or a preset "
            f"({', '.join(PRESETS)})."
        ) from None


def check_hub_model_available(hub_id: str, timeout_s: float = 3.0) -> None:
    """Refuse at once a hub id that is neither in this machine's Hugging Face cache nor downloadable: without a
    network, the hub client retries for about half a minute before it gives up."""
    import socket
    from urllib.parse import urlparse

    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(hub_id, trust_remote_code=False, local_files_only=True)
        return  # cached: loads without the network
    except (OSError, ValueError):
        pass
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    reason = "HF_HUB_OFFLINE is set" if offline else ""
    if not offline:
        try:
            port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
            socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
            return
        except OSError as error:
            reason = f"{endpoint.hostname} cannot be reached ({error.strerror or type(error).__name__})"
    raise ConfigError(
        f"model.source={hub_id!r} (no folder of that name here, so a hub id) is not in this machine's Hugging "
        f"Face cache and {reason}; download it where "
        f"there is a network (`hf download {hub_id} --local-dir DIR`) and give model.source DIR, or use a preset "
        f"({', '.join(PRESETS)})."
    )


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
    if spec.quantization != "none" and spec.dtype == "float32":
        raise ConfigError(
            f"model.quantization={spec.quantization} computes in 16-bit; set model.dtype to bfloat16 or float16."
        )
    adapter = spec.adapter
    if adapter is not None and spec.preset_overrides:
        raise ConfigError(
            "model.preset_overrides does not apply to an adapter source: its base's shape is the one it was "
            "trained on; remove model.preset_overrides."
        )
    _, overrides = spec.base_preset_settings
    config = resolve_model_config(spec.base_source, overrides)
    if spec.is_preset:  # its random weights are written there once
        check_writable_folder(cache_root(spec), "model.cache_dir" if spec.cache_dir else CACHE_FOLDER_SETTING)
    if spec.lora is not None:
        check_lora_targets(config, spec.lora)
    if adapter is not None and spec.lora is not None:
        check_lora_fits_adapter(adapter, spec.lora)
    return config


def check_lora_fits_adapter(adapter: AdapterFolder, lora: LoraSettings) -> None:
    """Training an adapter source further needs ``model.lora`` to describe that adapter (rank, scale, targets)."""
    wanted = (adapter.r, adapter.alpha, adapter.target_modules)
    configured = (lora.r, lora.alpha, tuple(sorted(lora.target_modules)))
    if configured != wanted:
        raise ConfigError(
            f"model.source {adapter.folder} is a LoRA adapter of r {adapter.r}, alpha {adapter.alpha} on "
            f"{list(adapter.target_modules)}, but model.lora has r {lora.r}, alpha {lora.alpha} on "
            f"{sorted(lora.target_modules)}; set model.lora to the adapter's shape to train it further, or "
            "model.lora: null to evaluate it."
        )


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


def load_adapter(model, adapter: AdapterFolder, lora: LoraSettings | None):
    """Put a saved LoRA adapter on ``model``: trainable, with ``lora``'s dropout, when ``lora`` is set (it
    matches the adapter: ``validate_model_spec``), frozen otherwise."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter.folder))
    if lora is not None:
        config.lora_dropout = lora.dropout
    config.inference_mode = lora is None
    return PeftModel.from_pretrained(model, str(adapter.folder), config=config, is_trainable=lora is not None)


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
    seed, _ = spec.base_preset_settings
    return preset_weights_folder(config, seed, cache_root(spec), torch.device(device))


def load_causal_lm(spec: ModelSpec, device: torch.device | str = "cpu", plan: ExecutionPlan | None = None):
    """Build the model a spec describes, weights loaded straight onto ``device``, with the kernels, compiled
    layers and checkpointing of ``plan`` (unset: the plan to evaluate on ``device``).

    Presets get random weights written once to a cache folder, then load like any checkpoint.
    """
    from transformers import AutoModelForCausalLM

    config = validate_model_spec(spec)
    device = torch.device(device)
    if plan is None:
        plan = resolve_plan(spec, "validate", Platform.detect(device))
    if spec.quantization != "none" and device.type not in ("cuda", "cpu", "xpu"):
        raise ConfigError(f"bitsandbytes quantization does not run on {device.type}; use a GPU or CPU.")
    base = spec.base_source
    if spec.is_preset:
        seed, _ = spec.base_preset_settings
        weights = preset_weights_folder(config, seed, cache_root(spec), device)
    else:
        weights = Path(base).expanduser() if Path(base).expanduser().is_dir() else base
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
    if plan.kernels == "liger":
        apply_liger_kernels(model)
    layers = model.config.num_hidden_layers
    if plan.activation_checkpointing != "off" and spec.keep_last_layers >= layers:
        # a valid run (a recipe shrunk by model.preset_overrides, say), but not the memory the user asked for
        notify(
            f"model.keep_last_layers={spec.keep_last_layers} keeps every one of the model's {layers} decoder "
            f"layers, so model.activation_checkpointing={plan.activation_checkpointing} changes nothing; set "
            f"model.keep_last_layers below {layers} for it to take effect."
        )
    apply_activation_checkpointing(model, plan.activation_checkpointing, spec.checkpoint_every, spec.keep_last_layers)
    adapter = spec.adapter
    if adapter is not None:
        model = load_adapter(model, adapter, spec.lora)
    elif spec.lora is not None:
        model = apply_lora(model, spec.lora)
    if plan.compile != "off":
        compile_layers(
            model, cuda_graphs=plan.compile == "layers-cudagraphs", whole_under_ddp=plan.layer_graphs_whole_under_ddp
        )
    elif spec.compile != "off" and plan.stage != "predict":
        notify(f"model.compile={spec.compile} is skipped: {plan.why('compile')}.")
    if plan.activation_checkpointing == "offload":
        offload_checkpointed_layers(model, spec.keep_last_layers)
    return model
