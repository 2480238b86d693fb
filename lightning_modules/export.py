"""Taking a trained model out of the framework: Hugging Face folders that need nothing of ours.

- ``adapter/``: the LoRA adapter as a PEFT folder, for ``PeftModel.from_pretrained(base, folder)``;
  its ``base_model_name_or_path`` is the real base (a hub id or a folder, never a cache path);
- ``merged/``: the adapter merged into its base, for ``AutoModelForCausalLM.from_pretrained`` alone.
  A quantized base (nf4, int8) is dequantized to the compute dtype first, so the merged model equals
  the adapter on the very weights it was trained on (the quantized ones), stored densely;
- ``model/``: a full fine-tune's whole model.

Every folder holds the tokenizer and ``smarter_export.json`` (what it is, what it equals, where it came
from), and every model folder is a valid ``model.source``. Folders are written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from foundation import ConfigError, atomic_path
from lightning_modules.model_building import PROVENANCE_FILE, ModelSpec
from lightning_modules.tokenizers import load_tokenizer


def base_reference(spec: ModelSpec) -> str:
    """What the base model is, for people and for PEFT: a hub id, an absolute folder, or a preset's name."""
    base = spec.base_source  # an adapter given as the source was trained on this base, and so is its sequel
    if spec.is_preset:
        return base
    folder = Path(base).expanduser()
    return str(folder.resolve()) if folder.is_dir() else base


def _provenance(spec: ModelSpec, kind: str, equals: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"source": base_reference(spec), "quantization": spec.quantization, "dtype": spec.dtype}
    if spec.is_preset:
        seed, overrides = spec.base_preset_settings
        base.update(preset=spec.base_source, preset_seed=seed, preset_overrides=overrides)
        base["how_to_build"] = (
            "random-weight preset: lightning_modules.load_causal_lm(ModelSpec(source=..., preset_seed=..., "
            "preset_overrides=...)) rebuilds it exactly"
        )
    return {
        "kind": kind,
        "equals": equals,
        "base": base,
        "lora": dataclasses.asdict(spec.lora) if spec.lora else None,
        **extra,
    }


def _write_common(folder: Path, spec: ModelSpec, provenance: dict[str, Any]) -> None:
    load_tokenizer(spec.tokenizer_source).save(folder)
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")


def _check_finite(named_parameters, what: str) -> None:
    for name, param in named_parameters:
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise ConfigError(f"refusing to export {what}: {name} holds non-finite values (the run diverged).")


# the attribute under which a wrapper module holds the module it wraps: an FSDP unit, activation checkpointing
WRAPPED_MODULE_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _wrapped_by(module: torch.nn.Module) -> torch.nn.Module | None:
    for attribute in WRAPPED_MODULE_ATTRIBUTES:
        inner = module._modules.get(attribute)
        if inner is not None:
            return inner
    return None


@contextlib.contextmanager
def wrappers_lifted(model: torch.nn.Module):
    """For the duration, every wrapper inside ``model`` stands aside: its parent holds the wrapped module
    itself, so names are the model's own. Under FSDP each decoder layer and adapter matrix is a unit whose
    parameters are named ``..._fsdp_wrapped_module...``; PEFT finds its layers by module names and drops
    the weights it cannot place, so an adapter saved through the wrappers lost its weights. (Under FSDP:
    inside ``summon_full_params``, where each parameter holds its whole tensor.)"""
    lifted = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            inner = child
            while inner is not None and (deeper := _wrapped_by(inner)) is not None:
                inner = deeper
            if inner is not child:
                lifted.append((parent, name, child))
                parent._modules[name] = inner
    try:
        yield model
    finally:
        for parent, name, child in reversed(lifted):
            parent._modules[name] = child


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """Every trainable weight of a peft-wrapped ``model`` by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _check_written_adapter(folder: Path, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
    """The folder holds every trained weight, under the name PEFT loads it by, with its values."""
    from safetensors.torch import load_file

    written = load_file(str(folder / "adapter_model.safetensors"))
    expected = {name.replace(f".{adapter_name}", ""): tensor for name, tensor in weights.items() if "lora_" in name}
    missing = sorted(set(expected) - set(written))
    wrong = [n for n in sorted(set(expected) & set(written)) if not torch.equal(written[n].cpu(), expected[n].cpu())]
    if missing or wrong or not expected:
        raise RuntimeError(
            f"the adapter export is incomplete ({len(missing)} of {len(expected)} weights missing, e.g. "
            f"{(missing or wrong or ['none trainable'])[:2]}; {len(wrong)} differ): nothing was written, and "
            "checkpoints are untouched. This is a bug of the export; please report it with the strategy used."
        )


def export_adapter(model, spec: ModelSpec, folder: Path, **extra: Any) -> Path:
    """Write the LoRA adapter of a peft-wrapped ``model`` as a PEFT folder (checked against the model's
    trained weights before it appears). A model inside FSDP: through ``export_trained_model``."""
    if spec.lora is None:
        raise ConfigError("this model has no LoRA adapter to export; export its whole model instead.")
    _check_finite([(n, p) for n, p in model.named_parameters() if p.requires_grad], "the adapter")
    config = model.peft_config["default"]
    saved_reference = config.base_model_name_or_path
    config.base_model_name_or_path = base_reference(spec)
    try:
        with atomic_path(folder) as staging:
            weights = adapter_weights(model)
            # no embedding layers train, and "auto" would look the base up on the hub
            model.save_pretrained(staging, save_embedding_layers=False)
            _check_written_adapter(staging, weights, "default")
            equals = f"a LoRA adapter (r {spec.lora.r}) for the {spec.quantization} base {base_reference(spec)}"
            _write_common(staging, spec, _provenance(spec, "adapter", equals, **extra))
    finally:
        config.base_model_name_or_path = saved_reference
    return folder


def _is_quantized_linear(module: torch.nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params")


def dequantize_weight(module: torch.nn.Module) -> torch.Tensor:
    """The dense weight ``(out, in)`` a bitsandbytes 4-bit or 8-bit linear layer computes with."""
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = module.state.SCB
    return bnb_functional.int8_vectorwise_dequant(weight.data, scale)


def dequantized_copy(base: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain (unquantized) copy of ``base`` in ``dtype``: quantized weights dequantized, the rest cast."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = base.config.__class__.from_dict(base.config.to_dict())
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    device = next(base.parameters()).device
    with no_init_weights(), torch.device(device):
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    dense_params = dict(dense.named_parameters())
    done = set()

    def plain(name: str) -> str:  # a name inside peft's LoRA wrappers, as in the plain model
        return name.replace(".base_layer", "")

    with torch.no_grad():
        for name, module in base.named_modules():
            if "lora_" not in name and _is_quantized_linear(module):
                dense_params[f"{plain(name)}.weight"].copy_(dequantize_weight(module).to(dtype))
                done.add(f"{plain(name)}.weight")
        for name, param in base.named_parameters():
            if "lora_" not in name and plain(name) not in done:
                dense_params[plain(name)].copy_(param.to(dtype))
                done.add(plain(name))
    missing = sorted(set(dense_params) - done)
    if missing:
        raise RuntimeError(f"dequantizing left weights unset: {missing[:3]}")
    return dense.eval()


def merged_model(model, spec: ModelSpec) -> torch.nn.Module:
    """The adapter of peft-wrapped ``model`` merged into its base, dequantized first if the base is quantized."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter_state = get_peft_model_state_dict(model)
    dense = dequantized_copy(model.get_base_model(), spec.torch_dtype)
    wrapped = get_peft_model(dense, copy.deepcopy(model.peft_config["default"]))
    set_peft_model_state_dict(wrapped, adapter_state)
    return wrapped.merge_and_unload()


def export_merged(model, spec: ModelSpec, folder: Path, **extra: Any) -> Path:
    """Write the adapter merged into its (dequantized) base as a Hugging Face model folder."""
    merged = merged_model(model, spec)
    _check_finite(merged.named_parameters(), "the merged model")
    if spec.quantization == "none":
        equals = f"the adapter on the {spec.dtype} base {base_reference(spec)}, merged"
    else:
        equals = (
            f"the adapter on the {spec.quantization} base {base_reference(spec)} (the weights it was trained on), "
            f"merged after dequantizing that base to {spec.dtype}; it is not the adapter on the original "
            "unquantized weights"
        )
    _save_model_folder(merged, spec, folder, _provenance(spec, "merged", equals, **extra))
    return folder


def export_full_model(model, spec: ModelSpec, folder: Path, **extra: Any) -> Path:
    """Write a fully fine-tuned model (no adapter) as a Hugging Face model folder."""
    if spec.lora is not None:
        raise ConfigError("this model trains a LoRA adapter; export the adapter or the merged model.")
    _check_finite(model.named_parameters(), "the model")
    equals = f"the whole fine-tuned model (started from {base_reference(spec)})"
    _save_model_folder(model, spec, folder, _provenance(spec, "model", equals, **extra))
    return folder


def _save_model_folder(model: torch.nn.Module, spec: ModelSpec, folder: Path, provenance: dict[str, Any]) -> None:
    saved_name = model.config._name_or_path
    model.config._name_or_path = base_reference(spec)  # never a cache path
    try:
        with atomic_path(folder) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            _write_common(staging, spec, provenance)
    finally:
        model.config._name_or_path = saved_name


def export_trained_model(model, spec: ModelSpec, folder: Path, merged: bool = False, **extra: Any) -> list[Path]:
    """Everything a trained model exports to, under ``folder``: ``adapter/`` (and ``merged/``), or ``model/``."""
    folder = Path(folder)
    with wrappers_lifted(model):
        if spec.lora is None:
            return [export_full_model(model, spec, folder / "model", **extra)]
        written = [export_adapter(model, spec, folder / "adapter", **extra)]
        if merged:
            written.append(export_merged(model, spec, folder / "merged", **extra))
        return written
