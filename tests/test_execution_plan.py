"""The execution plan: every shipped recipe x {CPU, a CUDA GPU (its capability given, nothing run on it)} x
{fit, validate, predict}, each checked against what should run there or the refusal it should meet, and the
train -> validate -> train transition that CUDA-graph layers need handled."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import REPO_ROOT, needs_book
from foundation import ConfigError
from lightning_modules import LoraSettings, MistralModule, ModelSpec
from lightning_modules.execution_plan import STAGES, Platform, resolve_plan
from smarter.config_files import expand_config_file

CPU = Platform(device="cpu", triton=True)
GPU = Platform(device="cuda", capability=(9, 0), liger=True, triton=True)  # an H100 with liger-kernel
GPU_WITHOUT_LIGER = dataclasses.replace(GPU, liger=False)
DDP = dataclasses.replace(GPU, strategy="ddp", strategy_name="MistralDDPStrategy")
FSDP = dataclasses.replace(GPU, strategy="fsdp", strategy_name="MistralFSDPStrategy", precision="bf16-true")


def _merge(into: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def model_settings(*configs: str) -> tuple[ModelSpec, str, dict]:
    """The ModelSpec, ``model.loss`` and ``model.generation`` that shipped config files give, merged in order
    (``extends`` followed) as the CLI merges them."""
    merged: dict = {}
    for config in configs:
        arguments = expand_config_file(REPO_ROOT / "configs" / config)
        for flag, value in zip(arguments[::2], arguments[1::2], strict=True):
            assert flag == "-c"
            content = yaml.safe_load(Path(value).read_text()) if Path(value).is_file() else yaml.safe_load(value)
            model = content.get("model") or {}
            _merge(merged, model.get("init_args", model) if "class_path" in model else model)
    loss = merged.pop("loss", "auto")
    generation = merged.pop("generation", None) or {}
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    return ModelSpec(**{k: v for k, v in merged.items() if k in fields}), loss, generation


def plan(configs: tuple[str, ...], platform: Platform, stage: str):
    spec, loss, generation = model_settings(*configs)
    decoding = {key: generation[key] for key in ("decoder", "matvec") if key in generation}
    return resolve_plan(spec, stage, platform, loss=loss, **decoding)


# what fit runs: (kernels, loss, compile, training graphs, checkpointing, adapters' compute)
RECIPES = {
    ("tiny.yaml",): {
        CPU: ("off", "logits", "off", False, "off", None),
        GPU: ("liger", "fused", "off", False, "off", None),
    },
    ("tiny-instructions.yaml",): {  # full fine-tuning of the quick start's export
        CPU: ("off", "logits", "off", False, "off", None),
        GPU: ("liger", "fused", "off", False, "off", None),
    },
    ("variants/bf16-sdpa.yaml",): {
        CPU: ("off", "logits", "off", False, "off", None),
        GPU: ("liger", "fused", "off", False, "off", None),
    },
    ("variants/nf4-eager.yaml",): {
        CPU: ("off", "logits", "off", False, "off", None),
        GPU: ("liger", "fused", "off", False, "off", None),
    },
    ("finetune/lora.yaml",): {  # over the 7B base in bf16
        CPU: ("off", "logits", "off", False, "every-layer", "float32"),
        GPU: ("liger", "fused", "off", False, "every-layer", "bfloat16"),
    },
    ("variants/bf16-sdpa.yaml", "finetune/lora.yaml"): {  # a float32 model: nothing to mix with
        GPU: ("liger", "fused", "off", False, "every-layer", "bfloat16"),
    },
    ("finetune/qlora.yaml",): {
        CPU: ("off", "logits", "off", False, "every-layer", "float32"),
        GPU: ("liger", "fused", "off", False, "every-layer", "bfloat16"),
        GPU_WITHOUT_LIGER: ("off", "chunked", "off", False, "every-layer", "bfloat16"),
    },
    ("finetune/qlora-fast.yaml",): {
        CPU: ("off", "logits", "off", False, "off", "float32"),
        GPU: ("off", "fused", "layers-cudagraphs", True, "off", "bfloat16"),
        GPU_WITHOUT_LIGER: ("off", "chunked", "layers-cudagraphs", True, "off", "bfloat16"),
        DDP: ("off", "fused", "layers-cudagraphs", True, "off", "bfloat16"),
    },
    ("finetune/qlora-lean.yaml",): {
        CPU: ("off", "logits", "off", False, "every-layer", "float32"),
        GPU: ("off", "fused", "layers", False, "every-layer", "bfloat16"),
        DDP: ("off", "fused", "layers", False, "every-layer", "bfloat16"),
    },
    ("finetune/qlora-offload.yaml",): {  # the CPU recomputes with inputs kept in place (nothing to offload to)
        CPU: ("off", "logits", "off", False, "offload", "float32"),
        GPU: ("off", "fused", "layers", False, "offload", "bfloat16"),
    },
    ("finetune/lora-bf16-fast.yaml",): {
        CPU: ("off", "logits", "off", False, "off", "float32"),
        GPU: ("off", "fused", "layers-cudagraphs", True, "off", "bfloat16"),
    },
    ("finetune/qlora-lean.yaml", "distributed/fsdp-qlora.yaml"): {
        FSDP: ("liger", "fused", "off", False, "every-layer", "bfloat16"),
    },
    ("extensions/bf16-sdpa-efficient.yaml",): {
        GPU: ("liger", "fused", "off", False, "off", None),
    },
}
CASES = [(configs, platform) for configs, platforms in RECIPES.items() for platform in platforms]


def _label(case) -> str:
    configs, platform = case
    return f"{'+'.join(Path(c).stem for c in configs)}@{platform.strategy if platform.cuda else ''}{platform.device}"


def test_every_shipped_recipe_is_in_the_table():
    shipped = {
        str(path.relative_to(REPO_ROOT / "configs"))
        for folder in ("finetune", "extensions")
        for path in (REPO_ROOT / "configs" / folder).glob("*.yaml")
    } | {path.name for path in (REPO_ROOT / "configs").glob("tiny*.yaml")}
    named = {config for configs in RECIPES for config in configs}
    assert shipped <= named, f"recipes without a row: {sorted(shipped - named)}"


@pytest.mark.parametrize("case", CASES, ids=[_label(case) for case in CASES])
def test_the_plan_of_each_recipe_on_each_platform_and_stage(case):
    configs, platform = case
    kernels, loss, compiled, graphs, checkpointing, adapters = RECIPES[configs][platform]
    plans = {stage: plan(configs, platform, stage) for stage in ("fit", "validate", "predict")}
    fit, validate, predict = plans["fit"], plans["validate"], plans["predict"]
    got = (fit.kernels, fit.loss, fit.compile, fit.training_graphs, fit.activation_checkpointing, fit.adapter_compute)
    assert got == (kernels, loss, compiled, graphs, checkpointing, adapters), fit.describe()
    # fit covers its validations: graphs replay in training passes only, gradients survive every transition
    assert not fit.evaluation_graphs and fit.gradients_zeroed_in_place == graphs
    assert fit.layer_graphs_whole_under_ddp == (compiled != "off" and platform.strategy == "ddp")
    # validate builds the same model, and trains nothing
    assert (validate.kernels, validate.loss, validate.compile) == (kernels, loss, compiled)
    assert not validate.training_graphs and not validate.gradients_zeroed_in_place
    assert fit.decoder is validate.decoder is None
    # predict decodes with uncompiled layers (its own step compiles), its adapters stored as they multiply
    assert predict.compile == "off" and not predict.training_graphs
    assert predict.decoder == "dynamic" and predict.matvec == "library"  # the shipped generation settings
    assert predict.adapters_stored_in == (adapters if adapters not in (None, "float32") else None)
    # the optimizer: one fused AdamW on a CUDA GPU (not under FSDP), the divergence verdict read a step later
    fused = platform.cuda and platform.strategy in ("single", "ddp")
    assert fit.optimizer_kernel == ("fused" if fused else "default")
    assert fit.divergence_check == ("deferred" if fused else "synchronous")
    assert validate.optimizer_kernel is validate.divergence_check is predict.optimizer_kernel is None
    for each in plans.values():  # every choice says why
        assert set(dict(each.reasons)) == set(each.choices()) - {"stage"}
        assert all(each.why(name) for name in each.choices() if name != "stage")


REFUSALS = [
    # (configs, platform, stage, extra spec fields, loss, generation, the refusal)
    (("finetune/qlora-fast.yaml",), FSDP, "fit", {"quant_storage": "bfloat16"}, None, {}, "cannot run under Mistral"),
    (("finetune/qlora-lean.yaml",), FSDP, "fit", {}, None, {}, "set model.quant_storage: bfloat16"),
    (("finetune/qlora.yaml",), dataclasses.replace(FSDP, precision="32-true"), "fit", {"quant_storage": "bfloat16"},
     None, {}, "trainer.precision 32-true would cast"),
    (("variants/int8-sdpa.yaml",), FSDP, "validate", {"dtype": "bfloat16"}, None, {}, "cannot shard LLM.int8 weights"),
    (("finetune/qlora.yaml",), dataclasses.replace(FSDP, device="cpu"), "fit", {}, None, {}, "runs on GPUs only"),
    (("finetune/qlora.yaml",), dataclasses.replace(GPU, strategy="other", strategy_name="DeepSpeedStrategy"), "fit",
     {}, None, {}, "cannot carry a bitsandbytes-quantized base"),
    (("finetune/qlora-fast.yaml",), GPU, "fit", {"activation_checkpointing": "every-layer"}, None, {},
     "cannot recompute checkpointed layers"),
    (("finetune/qlora-fast.yaml",), CPU, "validate", {"activation_checkpointing": "selective"}, None, {},
     "cannot recompute checkpointed layers"),
    (("finetune/qlora-lean.yaml",), DDP, "fit", {"activation_checkpointing": "offload"}, None, {}, "runs on one"),
    (("tiny.yaml",), CPU, "fit", {"kernels": "liger"}, None, {}, "model.kernels=liger needs a CUDA GPU"),
    (("tiny.yaml",), GPU_WITHOUT_LIGER, "fit", {"kernels": "liger"}, None, {}, "needs a CUDA GPU and liger-kernel"),
    (("tiny.yaml",), CPU, "fit", {}, "fused", {}, "model.loss=fused needs a CUDA GPU"),
    (("tiny.yaml",), CPU, "predict", {}, None, {"decoder": "static-compiled"}, "static-compiled needs a CUDA GPU"),
    (("tiny.yaml",), CPU, "predict", {}, None, {"decoder": "static", "matvec": "triton"}, "matvec=triton needs a"),
    (("tiny.yaml",), GPU, "predict", {}, None, {"matvec": "triton"}, "runs in the static decoders' step"),
]  # fmt: skip


@pytest.mark.parametrize("configs, platform, stage, fields, loss, generation, refusal", REFUSALS)
def test_what_cannot_run_is_refused_by_the_plan(configs, platform, stage, fields, loss, generation, refusal):
    spec, configured_loss, _ = model_settings(*configs)
    spec = dataclasses.replace(spec, **fields)
    with pytest.raises(ConfigError, match=refusal):
        resolve_plan(spec, stage, platform, loss=loss or configured_loss, **generation)


def test_the_optimizer_step_where_the_fused_adamw_cannot_skip_on_the_gpu():
    spec, loss, _ = model_settings("finetune/qlora-fast.yaml")
    scaled = resolve_plan(spec, "fit", dataclasses.replace(GPU, grad_scaler=True), loss=loss)
    assert (scaled.optimizer_kernel, scaled.divergence_check) == ("fused", "synchronous")
    assert "scaler" in scaled.why("divergence_check")
    eight_bit = resolve_plan(spec, "fit", GPU, loss=loss, optimizer="adamw-8bit")
    assert (eight_bit.optimizer_kernel, eight_bit.divergence_check) == ("bitsandbytes", "synchronous")


def test_the_decoder_and_its_kernels_on_a_gpu():
    """Asked for by name: the compiled static decoder takes the Triton mat-vec kernels and leaves Liger out."""
    fast = plan(("finetune/qlora-fast.yaml",), GPU, "predict")
    assert fast.decoder == "dynamic"
    spec, loss, _ = model_settings("finetune/qlora.yaml")
    compiled = resolve_plan(spec, "predict", GPU, loss=loss, decoder="static-compiled")
    assert (compiled.decoder, compiled.matvec, compiled.kernels) == ("static-compiled", "triton", "off")
    assert resolve_plan(spec, "predict", CPU, decoder="static").decoder == "static"


def test_the_plan_is_printed_before_weights_load(tmp_path, monkeypatch, capsys):
    """``smarter fit ... --print_plan`` prints each choice with its reason and exits 0, writing nothing; a plan
    that cannot run is the usual one-line refusal."""
    from smarter.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as printed:
        main(["fit", "-c", str(REPO_ROOT / "configs/finetune/qlora-fast.yaml"), "--print_plan"])
    assert printed.value.code == 0
    out = capsys.readouterr().out
    assert "execution plan for fit on cpu" in out
    assert "model.compile=layers-cudagraphs speeds up CUDA kernels only; skipped on cpu" in out
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit) as refused:
        main(["fit", "-c", str(REPO_ROOT / "configs/tiny.yaml"), "--model.kernels", "liger", "--print_plan"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("smarter: error: model.kernels=liger needs")


class _GradientTensorsSeen(L.Callback):
    """At each training batch's start: whether every trainable weight holds a gradient tensor, and which."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        grads = [p.grad for p in pl_module.trainable_parameters()]
        self.seen.append((all(g is not None for g in grads), [g.data_ptr() for g in grads if g is not None]))


@needs_book
def test_the_train_validate_train_transition_follows_the_plan():
    """With CUDA-graph layers (qlora-fast's fit plan on a GPU) each weight's gradient is allocated once and
    zeroed in place across every optimizer step and mid-epoch validation: dropped, the next backward made a
    graph's output the gradient and the next replay overwrote it (qlora-fast crashed at the first step after
    its mid-epoch validation). Run on a CPU with the plan's transition fields as the GPU plan has them."""
    from datamodules import TreasureIslandDataModule

    gpu_fit = plan(("finetune/qlora-fast.yaml",), GPU, "fit")
    assert gpu_fit.gradients_zeroed_in_place
    module = MistralModule(source="tiny", dtype="float32", lora=LoraSettings(r=4, alpha=8), warmup_steps=0)
    cpu_fit = module.resolve_plan("fit", CPU)
    assert not cpu_fit.gradients_zeroed_in_place
    module.plan = dataclasses.replace(cpu_fit, gradients_zeroed_in_place=gpu_fit.gradients_zeroed_in_place)
    seen = _GradientTensorsSeen()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
        max_steps=4,
        limit_train_batches=4,
        limit_val_batches=1,
        val_check_interval=2,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=TreasureIslandDataModule(block_size=64, batch_size=2))
    assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed >= 1  # it validated mid-epoch
    assert len(seen.seen) == 4
    assert all(every for every, _ in seen.seen)
    assert len({tuple(pointers) for _, pointers in seen.seen}) == 1  # the same tensors, zeroed in place


def test_no_module_level_switch_and_no_transformers_name_redefined():
    """Kernel routing, the grouped decode attention and the mat-vec dispatch belong to a model instance."""
    import re

    sources = {path: path.read_text() for folder in ("lightning_modules", "callbacks", "datamodules", "smarter")
               for path in (REPO_ROOT / folder).rglob("*.py")}  # fmt: skip
    for path, text in sources.items():
        tables = re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?::[^=\n]+)?=\s*[\[{]", text, re.M)  # module-level
        for name in tables:
            written = rf"\b{name}\[[^\]]+\]\s*=[^=]|\b{name}\.(update|setdefault|append|pop|clear|extend)\("
            assert not re.search(written, text), f"{path}: the module-level {name} is changed at run time"
        assert not re.search(r"AttentionInterface\.register\(\s*\"(sdpa|eager|flash_attention_\d)\"", text), path
        assert "optimize_ddp = " not in text, f"{path}: a process-wide dynamo setting"
    assert torch._dynamo.config.optimize_ddp is True  # torch's default, as every test leaves it


def test_the_spec_is_saved_as_configured_and_never_rewritten(tmp_path):
    """The spec a checkpoint holds is the configured one: the plan, not the spec, says what runs."""
    module = MistralModule(source="tiny", compile="layers-cudagraphs", kernels="auto")
    before = dataclasses.asdict(module.spec)
    module._trainer = None
    module.resolve_plan("predict", CPU)
    module.configure_model()
    assert dataclasses.asdict(module.spec) == before
    assert module.hparams["compile"] == "layers-cudagraphs" and module.plan.compile == "off"


@pytest.mark.parametrize("stage", STAGES)
def test_platform_detection_of_this_machine(stage):
    platform = Platform.detect(torch.device("cpu"))
    assert platform.device == "cpu" and platform.capability is None and platform.strategy == "single"
    assert resolve_plan(ModelSpec(source="tiny"), stage, platform).stage == stage
