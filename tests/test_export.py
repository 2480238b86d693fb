"""Exports: PEFT adapter and merged folders that plain peft / transformers load, a full fine-tune's whole
model, and every exported model folder usable again as ``model.source``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import cpu_trainer
from lightning_modules import LoraSettings, MistralModule, ModelSpec, load_causal_lm, load_tokenizer
from lightning_modules.export import (
    PROVENANCE_FILE,
    _check_written_adapter,
    adapter_weights,
    export_adapter,
    export_trained_model,
)
from smarter.cli import main

IDS = torch.randint(3, 32000, (2, 48), generator=torch.Generator().manual_seed(0))


def _train(tmp_path: Path, checkpoint: Path | None = None, **spec) -> MistralModule:
    from datamodules.treasure_island import TreasureIslandDataModule

    module = MistralModule(learning_rate=1e-2, warmup_steps=0, **spec)
    trainer = cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=TreasureIslandDataModule(block_size=64, batch_size=2))
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
    return module.eval()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _no_cache_path_in(folder: Path, cache: Path) -> None:
    for path in folder.glob("*.json"):
        assert str(cache) not in path.read_text(), path.name


@pytest.mark.parametrize(
    ("quantization", "dtype", "tolerance"), [("none", "float32", 1e-5), ("nf4", "bfloat16", 2e-2)], ids=["fp32", "nf4"]
)
def test_adapter_and_merged_folders_round_trip_through_plain_peft_and_transformers(
    tmp_path, book_path, isolated_environment, quantization, dtype, tolerance
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = {"source": "tiny", "quantization": quantization, "dtype": dtype, "lora": LoraSettings(r=4, alpha=16)}
    module = _train(tmp_path, **spec)
    trained = _logits(module.model)
    adapter, merged = export_trained_model(module.model, module.spec, tmp_path / "export", merged=True)

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # the real base, never a cache path
    _no_cache_path_in(adapter, isolated_environment)
    _no_cache_path_in(merged, isolated_environment)
    provenance = json.loads((merged / PROVENANCE_FILE).read_text())
    if quantization == "nf4":
        assert "dequantizing that base to bfloat16" in provenance["equals"]

    base = load_causal_lm(ModelSpec(source="tiny", quantization=quantization, dtype=dtype)).eval()
    on_base = _logits(PeftModel.from_pretrained(base, adapter).eval())
    assert _relative_error(on_base, trained) < 1e-6  # the adapter on its own base is the trained model

    alone = AutoModelForCausalLM.from_pretrained(merged).eval()  # transformers alone: no peft, no quantization
    assert not hasattr(alone.config, "quantization_config")
    assert _relative_error(_logits(alone), on_base) < tolerance

    tokenizer = load_tokenizer(str(merged))  # the tokenizer travels with the model
    assert tokenizer.encode("Fifteen men on the dead man's chest") == load_tokenizer().encode(
        "Fifteen men on the dead man's chest"
    )
    assert tokenizer.token_byte_lengths() == load_tokenizer().token_byte_lengths()


class _UnitWrapper(torch.nn.Module):
    """Holds a module one level down under FSDP's attribute name, as each FSDP unit does (a CPU stand-in)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = inner

    def __getattr__(self, name: str):  # attributes of the wrapped module show through, as FSDP's do
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._fsdp_wrapped_module, name)

    def forward(self, *args, **kwargs):
        return self._fsdp_wrapped_module(*args, **kwargs)


def _tiny_lora_with_trained_looking_adapters():
    spec = ModelSpec(source="tiny", dtype="float32", lora=LoraSettings(r=4, alpha=8))
    model = load_causal_lm(spec).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # zero when built: as training leaves them instead
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return spec, model


def test_an_adapter_under_wrapped_module_names_exports_every_trained_weight(tmp_path):
    """Under FSDP each decoder layer and adapter matrix is a unit, and parameter names gain
    ``_fsdp_wrapped_module.``; PEFT places weights by module names, and an export through the wrappers
    reloaded as the untrained adapter (with a warning). The export now sets the wrappers aside to write."""
    from peft import PeftModel
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_WRAPPED_MODULE
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    from lightning_modules.export import WRAPPED_MODULE_ATTRIBUTES

    assert WRAPPED_MODULE_ATTRIBUTES == (FSDP_WRAPPED_MODULE, _CHECKPOINT_WRAPPED_MODULE)  # torch's own names
    spec, model = _tiny_lora_with_trained_looking_adapters()
    trained = _logits(model)
    layers = model.base_model.model.model.layers
    for index in range(len(layers)):
        layers[index] = _UnitWrapper(layers[index])
    for module in list(model.modules()):
        for table in (getattr(module, "lora_A", None), getattr(module, "lora_B", None)):
            if isinstance(table, torch.nn.ModuleDict):
                for key in list(table):
                    table[key] = _UnitWrapper(table[key])
    assert _relative_error(_logits(model), trained) < 1e-6
    assert any("lora_B.default._fsdp_wrapped_module" in name for name, _ in model.named_parameters())

    (folder,) = export_trained_model(model, spec, tmp_path / "export")
    base = load_causal_lm(ModelSpec(source="tiny", dtype="float32")).eval()
    assert _relative_error(_logits(PeftModel.from_pretrained(base, folder).eval()), trained) < 1e-6


def test_the_adapter_export_check_refuses_a_missing_or_changed_weight(tmp_path):
    spec, model = _tiny_lora_with_trained_looking_adapters()
    folder = export_adapter(model, spec, tmp_path / "adapter")
    weights = adapter_weights(model)
    _check_written_adapter(folder, weights, "default")
    name = next(n for n in weights if "lora_A" in n)
    with pytest.raises(RuntimeError, match="1 of .* weights missing"):
        _check_written_adapter(folder, {**weights, name.replace("layers.0.", "layers.7."): weights[name]}, "default")
    with pytest.raises(RuntimeError, match="1 differ"):
        _check_written_adapter(folder, {**weights, name: weights[name] + 1}, "default")


def test_smarter_export_writes_both_folders_from_a_checkpoint_and_never_overwrites(tmp_path, book_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = _train(tmp_path, checkpoint, source="tiny", dtype="float32", lora=LoraSettings(r=4, alpha=8))
    main(["export", "--ckpt_path", str(checkpoint)])
    out = tmp_path / "run" / "export-last"
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "merged" / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert _relative_error(_logits(merged), _logits(module.model)) < 1e-5
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(SystemExit) as refused:
        main(["export", "--ckpt_path", str(checkpoint)])
    assert refused.value.code == 2 and sorted(p.name for p in out.rglob("*")) == before
