"""Building the model: attention backends agree, LoRA trains only adapters, bad specs fail early."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from foundation import ConfigError
from lightning_modules.model_building import (
    LoraSettings,
    ModelSpec,
    load_causal_lm,
    resolve_model_config,
    validate_model_spec,
)
from lightning_modules.presets import MISTRAL_7B_SHAPE, PRESETS


def _input_ids(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(3, 32000, (batch, seq))


def test_sdpa_and_eager_logits_agree(tiny_spec_kwargs):
    ids = _input_ids()
    eager = load_causal_lm(ModelSpec(**tiny_spec_kwargs, attention="eager")).eval()
    sdpa = load_causal_lm(ModelSpec(**tiny_spec_kwargs, attention="sdpa")).eval()
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)


def test_preset_weights_are_deterministic_and_cached(tiny_spec_kwargs, isolated_environment):
    first = load_causal_lm(ModelSpec(**tiny_spec_kwargs))
    second = load_causal_lm(ModelSpec(**tiny_spec_kwargs))
    other_seed = load_causal_lm(ModelSpec(**tiny_spec_kwargs, preset_seed=1))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[w], second.state_dict()[w])
    assert not torch.equal(first.state_dict()[w], other_seed.state_dict()[w])
    assert len(list((isolated_environment / "presets").glob("mistral-*/config.json"))) >= 2


def test_processes_needing_one_preset_take_turns_and_never_rewrite_it(tiny_spec_kwargs, isolated_environment):
    """The ranks of a distributed run ask for the same preset at once: one writes it while the others
    wait, and none replaces a folder another has finished (that once broke a reader mid-load)."""
    import fcntl
    import shutil
    import threading

    from lightning_modules.model_building import prepare_preset_weights

    spec = ModelSpec(**tiny_spec_kwargs)
    folder = prepare_preset_weights(spec)
    shutil.rmtree(folder)
    found = []
    with folder.with_name(f".{folder.name}.lock").open("a") as lock:  # another process is writing it
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: found.append(prepare_preset_weights(spec)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not folder.exists()  # it waits rather than drawing its own
        folder.mkdir()
        (folder / "config.json").write_text("written by the other process")
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(timeout=60)
    try:
        assert found == [folder]
        assert (folder / "config.json").read_text() == "written by the other process"  # not replaced
    finally:  # the real weights back, for the tests after this one
        shutil.rmtree(folder)
        prepare_preset_weights(spec)


def test_a_process_of_rank_1_writes_the_preset_it_holds_the_lock_for(
    tiny_spec_kwargs, isolated_environment, monkeypatch
):
    """transformers skips every file of save_pretrained on a rank other than 0 once torch.distributed is up:
    the rank that took the lock first wrote an empty folder, and the other rank, finding no config in it,
    drew the weights again and replaced the folder under the first one's load (a flaky 2-process fit)."""
    from lightning_modules.model_building import prepare_preset_weights

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    folder = prepare_preset_weights(ModelSpec(**tiny_spec_kwargs, preset_seed=7))
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))


def test_mistral_7b_preset_has_the_published_shape():
    config = resolve_model_config("mistral-7b")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        assert getattr(config, field) == MISTRAL_7B_SHAPE[field]
    assert config.num_key_value_heads == 8 and config.head_dim == 128 and config.sliding_window is None
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        skeleton = AutoModelForCausalLM.from_config(config)
    assert round(sum(p.numel() for p in skeleton.parameters()) / 1e9, 2) == 7.24


def test_preset_overrides_change_the_shape():
    config = resolve_model_config("tiny", {"num_hidden_layers": 3, "intermediate_size": 256})
    assert config.num_hidden_layers == 3 and config.intermediate_size == 256


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_lora_trains_only_adapters_and_leaves_the_base_bit_identical(quantization, tiny_spec_kwargs):
    kwargs = dict(tiny_spec_kwargs)
    if quantization != "none":
        kwargs["dtype"] = "bfloat16" if quantization == "nf4" else "float16"
    model = load_causal_lm(ModelSpec(**kwargs, quantization=quantization, lora=LoraSettings(r=4, alpha=8)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, seven projections, two layers
    ids = _input_ids()

    def frozen_base_logits() -> torch.Tensor:
        with torch.no_grad(), model.disable_adapter():
            return model(ids).logits.clone()

    logits_before = frozen_base_logits()
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(frozen_base_logits(), logits_before), "the frozen base computes something else"
    base_after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert base_before.keys() == base_after.keys()
    for key, before in base_before.items():
        assert torch.equal(before, base_after[key]), f"{key} changed"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "adapters did not train"


def test_merged_and_unmerged_adapters_give_the_same_logits(tiny_spec_kwargs):
    model = load_causal_lm(ModelSpec(**tiny_spec_kwargs, lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    for name, param in model.named_parameters():  # make the adapters non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    ids = _input_ids()
    with torch.no_grad():
        unmerged = model(ids).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(ids).logits
    base = load_causal_lm(ModelSpec(**tiny_spec_kwargs)).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, unmerged, atol=1e-3)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantization", ["nf4", "nf4-dq", "int8"])
def test_quantized_tiny_preset_runs_and_stays_close_to_bf16(quantization):
    dtype = "float16" if quantization == "int8" else "bfloat16"
    reference = load_causal_lm(ModelSpec(source="tiny", dtype=dtype)).eval()
    quantized = load_causal_lm(ModelSpec(source="tiny", dtype=dtype, quantization=quantization)).eval()
    import bitsandbytes as bnb

    layer_type = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    assert isinstance(quantized.model.layers[0].mlp.up_proj, layer_type)
    ids = _input_ids()
    with torch.no_grad():
        ref = reference(ids).logits.float()
        out = quantized(ids).logits.float()
    relative_error = (out - ref).norm() / ref.norm()
    assert torch.isfinite(out).all()
    assert relative_error < 0.3  # quantization noise, not a different model
    assert relative_error > 0  # the weights really were quantized


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quantization": "nf5"}, r"model.quantization='nf5' is not supported; choose one of"),
        ({"attention": "flash"}, r"model.attention='flash' is not supported"),
        ({"dtype": "float8"}, r"model.dtype='float8' is not supported"),
        ({"source": "mistral-8b"}, r"not a preset \(tiny, mistral-7b\)"),
        ({"source": "/no/such/folder"}, r"not a preset"),
        ({"preset_overrides": {"num_layerz": 3}}, r"unknown MistralConfig fields \['num_layerz'\]"),
        ({"lora": LoraSettings(target_modules=["q_proj", "qkv"])}, r"\['qkv'\] match no linear layer"),
        ({"lora": LoraSettings(r=0)}, r"model.lora.r must be >= 1"),
        ({"quantization": "nf4", "dtype": "float32"}, r"computes in 16-bit"),
    ],
)
def test_bad_specs_are_refused_before_any_weights_load(change, message, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the spec was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    spec = dataclasses.replace(ModelSpec(source="tiny"), **change)
    with pytest.raises(ConfigError, match=message):
        validate_model_spec(spec)
    with pytest.raises(ConfigError, match=message):
        load_causal_lm(spec)


def test_presets_are_registered():
    assert set(PRESETS) == {"tiny", "mistral-7b"}


def test_saving_a_4bit_model_does_not_change_what_it_computes():
    model = load_causal_lm(ModelSpec(source="tiny", dtype="bfloat16", quantization="nf4")).eval()
    ids = _input_ids()
    with torch.no_grad():
        model(ids)  # a first no-grad forward (where bitsandbytes may repack on CPU)
        before = model(ids).logits
        model.state_dict()  # what every checkpoint save calls
        after = model(ids).logits
    assert torch.equal(before, after)
