"""Callbacks: kernel tracing, throughput/memory, FLOPs counting, and perplexity under DDP."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import KernelTraceCallback, ThroughputMemoryCallback
from callbacks.flops import flops_per_token, linear_weights
from datamodules.treasure_island import TreasureIslandDataModule
from foundation import IGNORE_INDEX, ConfigError
from helpers import THROUGHPUT, TINY, TRACE, cpu_trainer, scalars
from lightning_modules import LoraSettings, MistralModule
from lightning_modules.model_building import resolve_model_config
from smarter.cli import main


def _check_trace_folder(folder: Path, stage: str) -> dict:
    (trace,) = folder.glob(f"{stage}-cycle1.pt.trace.json.gz")
    with gzip.open(trace, "rt") as handle:
        events = json.load(handle)["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
    summary = json.loads((folder / f"{stage}-cycle1.kernel_summary.json").read_text())
    totals = summary["totals"]
    per_step = sum(step["device_time_ms"] for step in summary["steps"])
    assert totals["steps"] == 3 and per_step > 0
    assert totals["operator_self_device_ms"] == pytest.approx(per_step, rel=0.05)
    assert all(step["kernel_count"] > 0 for step in summary["steps"])
    assert summary["metadata"]["stage"] == stage and summary["metadata"]["versions"]["torch"]
    assert (folder / f"{stage}-cycle1.top_ops.txt").read_text().startswith("Top kernels")
    return summary


def test_validate_with_tracing_writes_traces_summary_and_scalars(tmp_path, monkeypatch, book_path):
    monkeypatch.chdir(tmp_path)
    main(["validate", "-c", TINY, "-c", TRACE, "-c", THROUGHPUT, "--trainer.enable_progress_bar", "false"])
    run = next((tmp_path / "runs" / "tiny" / "validate").glob("version_*"))  # scoring runs are named by command
    summary = _check_trace_folder(run / "kernel_trace", "val")
    assert summary["metadata"]["batch_shape"] == [8, 256]
    assert summary["kernels"][0]["name"] == "aten::mm"  # matmuls dominate even the tiny model
    logged = scalars(run)
    for key in (
        "val/ppl",
        "val/bits_per_byte",
        "perf/val/tokens_per_s",
        "perf/val/samples_per_s",
        "perf/val/step_time_ms",
        "perf/val/host_rss_gib",
        "prof/val/device_time_ms",
        "prof/val/kernel_count",
    ):
        assert key in logged, key
    assert len(logged["prof/val/device_time_ms"]) == 3


@pytest.mark.parametrize("stage", ["train", "test"])
def test_tracing_and_throughput_in_fit_and_test(stage, tmp_path, monkeypatch, book_path):
    monkeypatch.chdir(tmp_path)
    command = "fit" if stage == "train" else "test"
    main(
        [
            command,
            "-c",
            TINY,
            "-c",
            TRACE,
            "-c",
            THROUGHPUT,
            "--data.block_size",
            "64",
            "--trainer.max_steps",
            "8",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.limit_test_batches",
            "8",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    run = next((tmp_path / "runs" / "tiny" / ("" if command == "fit" else command)).glob("version_*"))
    _check_trace_folder(run / "kernel_trace", stage)
    logged = scalars(run)
    assert logged[f"perf/{stage}/tokens_per_s"][-1][1] > 0
    assert logged[f"perf/{stage}/tflops_per_s"][-1][1] > 0
    # every position computed is counted as input; only scored ones as tokens (evaluation windows overlap)
    ratio = logged[f"perf/{stage}/input_tokens_per_s"][-1][1] / logged[f"perf/{stage}/tokens_per_s"][-1][1]
    assert ratio == pytest.approx(1.0, abs=0.02) if stage == "train" else ratio > 1.5


def test_window_longer_than_the_run_is_shrunk_to_fit_and_traces_real_batches(tmp_path, book_path):
    trace = KernelTraceCallback(wait=1, warmup=2, active=10, output_dir=str(tmp_path / "trace"))
    with pytest.warns(UserWarning, match="the val run has 3 batches.*shrunk to wait 0, warmup 1, active 2"):
        cpu_trainer(tmp_path, [trace], limit_val_batches=3).validate(
            MistralModule(source="tiny", dtype="float32"), datamodule=TreasureIslandDataModule(block_size=64)
        )
    (summary,) = trace.summaries
    assert [step["kernel_count"] for step in summary["steps"]] == [summary["steps"][0]["kernel_count"]] * 2
    assert summary["steps"][0]["kernel_count"] > 100  # a whole forward pass, not the epoch-end tail
    assert summary["metadata"]["schedule"] == {"wait": 0, "warmup": 1, "active": 2, "repeat": 1}


def test_a_run_that_ends_early_never_reports_the_empty_tail_as_a_step(tmp_path, book_path, monkeypatch):
    trace = KernelTraceCallback(wait=0, warmup=1, active=5, output_dir=str(tmp_path / "trace"))
    monkeypatch.setattr(KernelTraceCallback, "_available_batches", lambda *a: float("inf"))  # a wrong estimate
    with pytest.warns(UserWarning, match="ended after 3 profiled batches"):
        cpu_trainer(tmp_path, [trace], limit_val_batches=3).validate(
            MistralModule(source="tiny", dtype="float32"), datamodule=TreasureIslandDataModule(block_size=64)
        )
    (summary,) = trace.summaries
    assert len(summary["steps"]) == 2  # batches 2 and 3; the tail after batch 3 is left out
    assert all(step["kernel_count"] > 100 for step in summary["steps"])


def test_unwritable_output_folder_switches_tracing_off_and_the_run_continues(tmp_path, book_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    trace = KernelTraceCallback(output_dir=str(blocker / "trace"))
    trainer = cpu_trainer(tmp_path, [trace], limit_val_batches=3)
    with pytest.warns(UserWarning, match="Kernel tracing switched off: cannot write"):
        trainer.validate(
            MistralModule(source="tiny", dtype="float32"), datamodule=TreasureIslandDataModule(block_size=64)
        )
    assert "val/ppl" in trainer.callback_metrics
    assert not trace.enabled and not trace.summaries


def test_failing_trace_export_never_stops_training(tmp_path, book_path, monkeypatch):
    trace = KernelTraceCallback(wait=0, warmup=1, active=1, output_dir=str(tmp_path / "trace"))
    monkeypatch.setattr(
        torch.profiler.profile,
        "export_chrome_trace",
        lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")),
    )
    trainer = cpu_trainer(tmp_path, [trace], max_steps=4, limit_val_batches=0)
    with pytest.warns(UserWarning, match="disk full"):
        trainer.fit(
            MistralModule(source="tiny", dtype="float32"),
            datamodule=TreasureIslandDataModule(block_size=64, batch_size=2),
        )
    assert trainer.global_step == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"active": 0}, "active=0 records nothing"),
        ({"wait": -1}, "must be >= 0"),
        ({"repeat": 0}, "repeat=0"),
        ({"stages": ["training"]}, "unknown stages"),
    ],
)
def test_bad_trace_schedules_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KernelTraceCallback(**kwargs)


def test_bad_throughput_settings_are_refused():
    with pytest.raises(ConfigError, match="peak_tflops must be > 0"):
        ThroughputMemoryCallback(peak_tflops=0)


def test_linear_weight_count_matches_the_model():
    for source in ("tiny", "mistral-7b"):
        config = resolve_model_config(source)
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config)
        counted = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert linear_weights(config) == counted


def test_flops_per_token_follows_the_documented_rule():
    config = resolve_model_config("mistral-7b")
    forward = flops_per_token(config, seq_len=1)
    # 7.24 B parameters less 131 M of embeddings: ~14.2 GFLOP per token at context 1
    assert forward == pytest.approx(2 * (7.2417e9 - 32000 * 4096), rel=1e-3)
    long = flops_per_token(config, seq_len=4095)
    assert long - forward == pytest.approx(4 * 32 * 32 * 128 * (2048 - 1), rel=1e-9)
    assert flops_per_token(config, 1024, "train-full") == 3 * flops_per_token(config, 1024)
    lora = flops_per_token(config, 1024, "train-lora", lora_weights=10)
    assert lora == 2 * flops_per_token(config, 1024) + 60


def test_throughput_counts_scored_tokens_only(tmp_path, book_path):
    meter = ThroughputMemoryCallback(warmup_steps=0)
    module = MistralModule(source="tiny", dtype="float32", lora=LoraSettings(r=4, alpha=8))
    datamodule = TreasureIslandDataModule(block_size=64, eval_stride=16)
    cpu_trainer(tmp_path, [meter]).validate(module, datamodule=datamodule)
    labels = datamodule.datasets["val"].tensors["labels"]
    result = meter.summary["val"]
    scored = int((labels != IGNORE_INDEX).sum())
    assert result["timed_steps"] == -(-len(labels) // datamodule.eval_batch_size)
    total_seconds = result["step_time_ms"] * result["timed_steps"] / 1000
    assert result["tokens_per_s"] * total_seconds == pytest.approx(scored, rel=1e-6)
    assert scored < labels.numel() / 3  # stride 16 of 64: most positions are context, not work


class _SlowBetweenBatches(L.Callback):
    """Spends ``seconds`` before each training batch, outside the throughput callback's step window, and
    ``validation_seconds`` before each validation batch."""

    def __init__(self, seconds: float, validation_seconds: float) -> None:
        self.seconds, self.validation_seconds = seconds, validation_seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        time.sleep(self.seconds)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        time.sleep(self.validation_seconds)


def test_wall_throughput_counts_the_time_between_batches_but_not_warm_up_or_validation(tmp_path, book_path):
    meter = ThroughputMemoryCallback(warmup_steps=2)
    module = MistralModule(source="tiny", dtype="float32", lora=LoraSettings(r=4, alpha=8))
    datamodule = TreasureIslandDataModule(block_size=64, batch_size=4)
    slow = _SlowBetweenBatches(0.1, validation_seconds=0.3)
    trainer = cpu_trainer(tmp_path, [slow, meter], max_steps=7, limit_val_batches=2, val_check_interval=3)
    trainer.fit(module, datamodule=datamodule)
    assert meter.summary["val"]["timed_steps"] == 0 and trainer.callback_metrics["val/ppl"] > 0  # it ran: 2 batches
    result = meter.summary["train"]
    assert result["timed_steps"] == 5
    step_seconds = result["step_time_ms"] * 5 / 1000
    tokens = result["tokens_per_s"] * step_seconds
    between = tokens / result["wall_tokens_per_s"] - step_seconds
    # timed batches 3-7; validation ran after steps 3 and 6, so the gaps before batches 4 and 7 (each
    # holding a validation, 0.6 s asleep) are dropped whole: three 0.1 s sleeps remain, none from warm-up
    assert 3 * 0.1 <= between < 3 * 0.1 + 0.25
