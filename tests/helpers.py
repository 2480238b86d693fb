"""Helpers shared by the test modules: TensorBoard scalars, a CPU trainer, the command in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs/tiny.yaml")
TRACE = str(REPO_ROOT / "configs/callbacks/kernel_trace.yaml")
THROUGHPUT = str(REPO_ROOT / "configs/callbacks/throughput.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the (single) TensorBoard event file under ``log_dir``: tag -> [(step, value)]."""
    (event_file,) = Path(log_dir).rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file.parent))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def cpu_trainer(tmp_path: Path | None = None, callbacks: list | None = None, **kwargs) -> L.Trainer:
    """A quiet one-process CPU trainer with no logger and no checkpoints unless asked."""
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "callbacks": callbacks or [],
    }
    if tmp_path is not None:
        defaults["default_root_dir"] = str(tmp_path)
    return L.Trainer(**{**defaults, **kwargs})


def run_smarter(*args: str, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``smarter ARGS`` in a fresh process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "smarter.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def error_lines(stderr: str) -> list[str]:
    """The ``smarter: error:`` lines of a run's standard error."""
    return [line for line in stderr.splitlines() if line.startswith("smarter: error:")]


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Replace ``owner.name`` (a function) by one that calls it and appends 1 to the list returned."""
    calls: list[int] = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def decode_step_logits(model, prompt, triton_matvec: bool, four_bit_matvec: bool = True):
    """Logits of the eager static-cache decoder's first step after reading ``prompt`` ``(1, n)``: its last
    token again, at position n."""
    import torch

    from lightning_modules.generation import StaticCacheDecoder

    length = prompt.shape[1]
    decoder = StaticCacheDecoder(
        model, max_cache_len=length + 20, compiled=False, triton_matvec=triton_matvec, four_bit_matvec=four_bit_matvec
    )
    with torch.inference_mode():
        decoder.prefill(prompt)
        return decoder.step(prompt[:, -1:], torch.tensor([length])).float()
