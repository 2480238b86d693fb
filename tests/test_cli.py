"""The ``smarter`` command: every shipped config, subclasses, TensorBoard output, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT
from lightning_modules import MistralModule
from smarter.cli import build_cli, main

CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
VARIANTS = sorted((REPO_ROOT / "configs" / "variants").glob("*.yaml"))


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``log_dir``."""
    (event_file,) = log_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file.parent))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_the_shipped_configs_are_the_expected_ones():
    names = {str(p.relative_to(REPO_ROOT / "configs")) for p in CONFIGS}
    expected_variants = {f"variants/{q}-{a}.yaml" for q in ("bf16", "int8", "nf4") for a in ("eager", "sdpa")}
    assert expected_variants | {"tiny.yaml", "finetune/qlora.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_every_config_parses_and_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    is_snippet = config.parent.name == "callbacks"  # added on top of a main config
    args = ["-c", str(REPO_ROOT / "configs/tiny.yaml")] if is_snippet else []
    cli = build_cli([*args, "-c", str(config)], run=False)
    if is_snippet:
        assert len(cli.trainer.callbacks) > len(build_cli(args, run=False).trainer.callbacks)
    assert isinstance(cli.model, MistralModule)
    assert cli.model.model is None  # weights load only in configure_model
    assert cli.datamodule.block_size <= cli.model.max_positions


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.stem)
def test_every_variant_validates_on_cpu_with_the_tiny_preset(variant, tmp_path, monkeypatch, book_path):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "validate",
            "-c",
            str(variant),
            "--model.source",
            "tiny",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    logged = scalars(tmp_path / "runs")
    assert {"val/loss", "val/ppl", "val/bits_per_byte"} <= set(logged)
    ppl = logged["val/ppl"][-1][1]
    assert 1000 < ppl < 1e6  # random weights: close to the vocabulary size, and finite


def test_a_subclass_of_the_module_runs_through_the_cli(tmp_path, monkeypatch, book_path):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "-c",
            str(REPO_ROOT / "configs/tiny.yaml"),
            "--model",
            "custom_modules.ZLossMistralModule",
            "--model.z_loss_coef",
            "0.001",
            "--data.block_size",
            "64",
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.val_check_interval",
            "3",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    logged = scalars(tmp_path / "runs")
    assert len(logged["train/z_loss"]) >= 1
    config = next((tmp_path / "runs").rglob("config.yaml")).read_text()
    assert "custom_modules.ZLossMistralModule" in config and "z_loss_coef: 0.001" in config


def _run_smarter(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smarter.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_bad_choice_on_the_command_line_names_the_choices(tmp_path):
    result = _run_smarter(
        "validate", "-c", str(REPO_ROOT / "configs/tiny.yaml"), "--model.quantization", "nf5", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "nf5" in result.stderr and "nf4-dq" in result.stderr


def test_config_error_is_one_line_with_the_fix_and_no_traceback(tmp_path, book_path):
    result = _run_smarter(
        "validate", "-c", str(REPO_ROOT / "configs/tiny.yaml"), "--data.block_size", "4096", cwd=tmp_path
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("smarter: error:")]
    assert errors == [
        "smarter: error: data.block_size=4096 exceeds the model's maximum positions (2048); lower data.block_size."
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_tiny_quick_start_learns_the_book(tmp_path, monkeypatch, book_path):
    """The README's main job, as shipped: trains the tiny preset and cuts val perplexity."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(REPO_ROOT / "configs/tiny.yaml"), "--trainer.enable_progress_bar", "false"])
    logged = scalars(tmp_path / "runs" / "tiny")
    ppl = [value for _, value in logged["val/ppl"]]
    assert len(ppl) == 4
    assert ppl[-1] < 0.6 * ppl[0]
    assert ppl[-1] < 700  # beats a unigram model of the book (about 700)
    assert {"train/loss", "val/loss", "val/bits_per_byte"} <= set(logged)
    assert list((tmp_path / "runs" / "tiny").rglob("*.ckpt"))
