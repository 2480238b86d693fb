"""Kernel tracing with torch.profiler for any stage: Perfetto/TensorBoard traces and a kernel summary.

Lightning's ``PyTorchProfiler`` is a Trainer-wide profiler that wraps every hook and writes one trace
per stage; it has no step-aligned kernel summary. This callback profiles a wait / warm-up / active
window of batches of the stage being run and, per active cycle, writes:

- ``<stage>-cycle<N>.pt.trace.json.gz``: a Chrome trace (opens in Perfetto, and in TensorBoard's
  profiler plugin, which reads ``*.pt.trace.json.gz``);
- ``<stage>-cycle<N>.kernel_summary.json``: per kernel and aten operator calls, total and mean self
  time, share of device time; per-step device time, CPU time and kernel count; run metadata;
- ``<stage>-cycle<N>.top_ops.txt``: the same, as a plain table;

and logs ``prof/<stage>/device_time_ms``, ``prof/<stage>/cpu_time_ms`` and
``prof/<stage>/kernel_count`` per profiled step. With several processes (DDP, FSDP) each traces its own
work into files named ``<stage>-cycle<N>-rank<R>.*`` (the logged figures are the first process's).
Tracing never stops the run: if it fails, it warns and switches itself off.
"""

from __future__ import annotations

import contextlib
import json
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile, schedule

from callbacks.kernel_summary import format_top_table, summarize_profile
from callbacks.stage_hooks import StageCallback
from foundation import STAGE_OF_TRAINER_FN, STAGES, ConfigError, Stage


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide which kernels run."""
    import importlib.metadata as metadata

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("lightning", "transformers", "bitsandbytes", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["cuda"] = str(torch.version.cuda)
    return versions


def run_metadata(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """What ran: variant, model spec and shape, device and versions."""
    meta: dict[str, Any] = {
        "variant": getattr(trainer.logger, "name", None) if trainer.logger else None,
        "versions": library_versions(),
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"),
    }
    spec = getattr(pl_module, "spec", None)
    if spec is not None:
        meta["model"] = spec.describe()
    config = getattr(pl_module, "model_config", None)
    if config is not None:
        fields = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
        meta["model_shape"] = {name: getattr(config, name, None) for name in fields}
    return meta


class KernelTraceCallback(StageCallback):
    """Profile a window of batches with torch.profiler and summarize the kernels.

    Args:
        wait: Batches skipped before each cycle.
        warmup: Batches traced but discarded (the profiler's own start-up) before each active window.
        active: Batches recorded per cycle.
        repeat: Number of cycles.
        stages: Stages to profile (``train``, ``val``, ``test``, ``predict``); unset profiles the stage the run
            is for (``fit`` profiles ``train``, ``validate`` profiles ``val``).
        record_shapes: Record operator input shapes.
        profile_memory: Record tensor allocations.
        with_stack: Record Python stacks (large traces).
        output_dir: Folder for traces and summaries; unset means ``<log dir>/kernel_trace``.
        top_k: Rows kept in the summary tables.
    """

    def __init__(
        self,
        wait: int = 1,
        warmup: int = 2,
        active: int = 3,
        repeat: int = 1,
        stages: list[Stage] | None = None,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        output_dir: str | None = None,
        top_k: int = 25,
    ) -> None:
        super().__init__()
        if active < 1:
            raise ConfigError(f"kernel trace: active={active} records nothing; set active >= 1.")
        if wait < 0 or warmup < 0:
            raise ConfigError(f"kernel trace: wait ({wait}) and warmup ({warmup}) must be >= 0.")
        if repeat < 1:
            raise ConfigError(f"kernel trace: repeat={repeat}; set repeat >= 1.")
        unknown = sorted(set(stages or []) - set(STAGES))
        if unknown:
            raise ConfigError(f"kernel trace: unknown stages {unknown}; use {', '.join(STAGES)}.")
        self.wait, self.warmup, self.active, self.repeat = wait, warmup, active, repeat
        self.stages = list(stages) if stages else None
        self.record_shapes = record_shapes
        self.profile_memory = profile_memory
        self.with_stack = with_stack
        self.output_dir = output_dir
        self.top_k = top_k
        self.enabled = True
        self.summaries: list[dict[str, Any]] = []
        self._profiler: profile | None = None
        self._profiled_stages: set[str] = set()
        self._stage: str | None = None
        self._cycle = 0
        self._batch_shape: list[int] | None = None
        self._out: Path | None = None
        self._meta: dict[str, Any] = {}
        self._trainer: L.Trainer | None = None
        self._plan = (wait, warmup, active, repeat)
        self._stopped_early = False

    @property
    def steps_per_run(self) -> int:
        return (self.wait + self.warmup + self.active) * self.repeat

    @property
    def _planned_steps(self) -> int:
        wait, warmup, active, repeat = self._plan
        return (wait + warmup + active) * repeat

    # ---- setup ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        folder = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or ".") / "kernel_trace"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe"):  # a name of this process's own
                pass
        except OSError as error:
            self._disable(f"cannot write to the output folder {folder} ({error}); set output_dir")
            return
        self._out = folder
        self._meta = run_metadata(trainer, pl_module)

    def _wanted(self, stage: str, trainer: L.Trainer) -> bool:
        if not self.enabled or trainer.sanity_checking or stage in self._profiled_stages:
            return False
        if self.stages is not None:
            return stage in self.stages
        return STAGE_OF_TRAINER_FN.get(getattr(trainer.state.fn, "value", ""), "") == stage

    def _disable(self, reason: str) -> None:
        warnings.warn(f"Kernel tracing switched off: {reason}. The run continues.", stacklevel=2)
        self.enabled = False
        if self._profiler is not None:
            with contextlib.suppress(Exception):  # the profiler is being discarded anyway
                self._profiler.stop()
            self._profiler = None

    def _available_batches(self, stage: str, trainer: L.Trainer) -> float:
        if stage == "train":
            max_steps = float(trainer.max_steps) if trainer.max_steps > 0 else float("inf")
            return min(float(trainer.num_training_batches), max_steps)
        counts = {
            "val": trainer.num_val_batches,
            "test": trainer.num_test_batches,
            "predict": trainer.num_predict_batches,
        }[stage]
        return float(sum(counts)) if isinstance(counts, list) else float(counts)

    # ---- profiling -----------------------------------------------------------------------
    def fit_schedule(self, available: float) -> tuple[int, int, int, int]:
        """(wait, warmup, active, repeat), shrunk to fit a stage of ``available`` batches."""
        if available >= self.steps_per_run:
            return self.wait, self.warmup, self.active, self.repeat
        batches = max(int(available), 1)
        active = max(1, min(self.active, batches - 1 if batches > 1 else 1))  # keep one warm-up if possible
        warmup = min(self.warmup, batches - active)
        wait = min(self.wait, batches - active - warmup)
        return wait, warmup, active, 1

    def _start(self, stage: str, trainer: L.Trainer) -> None:
        available = self._available_batches(stage, trainer)
        self._plan = self.fit_schedule(available)
        if self._plan != (self.wait, self.warmup, self.active, self.repeat):
            wait, warmup, active, repeat = self._plan
            warnings.warn(
                f"Kernel trace: the {stage} run has {available:g} batches but the schedule needs "
                f"(wait {self.wait} + warmup {self.warmup} + active {self.active}) x {self.repeat} = "
                f"{self.steps_per_run}; shrunk to wait {wait}, warmup {warmup}, active {active}, repeat {repeat}. "
                "Raise the batch limit or lower the schedule to choose yourself.",
                stacklevel=2,
            )
        wait, warmup, active, repeat = self._plan
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._stage = stage
        self._cycle = 0
        self._stopped_early = False
        self._profiler = profile(
            activities=activities,
            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
            on_trace_ready=self._on_trace_ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        self._profiler.start()

    def _on_trace_ready(self, prof: profile) -> None:
        try:
            self._cycle += 1
            name = f"{self._stage}-cycle{self._cycle}"
            trainer = self._trainer
            if trainer is not None and trainer.world_size > 1:  # every process traces its own work
                name += f"-rank{trainer.global_rank}"
            prof.export_chrome_trace(str(self._out / f"{name}.pt.trace.json.gz"))
            on_gpu = any(a == ProfilerActivity.CUDA for a in prof.activities)
            summary = summarize_profile(
                prof.events(), on_gpu=on_gpu, top_k=self.top_k, drop_last_step=self._stopped_early
            )
            if not summary["steps"]:
                raise RuntimeError("the cycle recorded no complete batch")
            summary["metadata"] = {
                **self._meta,
                "stage": self._stage,
                "cycle": self._cycle,
                "batch_shape": self._batch_shape,
                "schedule": dict(zip(("wait", "warmup", "active", "repeat"), self._plan, strict=True)),
                "requested_schedule": {
                    "wait": self.wait,
                    "warmup": self.warmup,
                    "active": self.active,
                    "repeat": self.repeat,
                },
            }
            (self._out / f"{name}.kernel_summary.json").write_text(json.dumps(summary, indent=2))
            (self._out / f"{name}.top_ops.txt").write_text(format_top_table(summary) + "\n")
            self.summaries.append(summary)
            self._log_step_scalars(summary)
        except Exception as error:
            self._disable(f"writing the {self._stage} trace failed ({error!r})")

    def _log_step_scalars(self, summary: dict[str, Any]) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.loggers:
            return
        wait, warmup, active, _ = self._plan
        first = (self._cycle - 1) * (wait + warmup + active) + wait + warmup
        for offset, step in enumerate(summary["steps"]):
            metrics = {
                f"prof/{self._stage}/{key}": float(step[key])
                for key in ("device_time_ms", "cpu_time_ms", "kernel_count")
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=first + offset)

    def on_stage_batch_start(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        if self._profiler is None and self._wanted(stage, trainer):
            try:
                self._start(stage, trainer)
            except Exception as error:
                self._disable(f"starting torch.profiler failed ({error!r})")
        if self._profiler is not None and self._batch_shape is None and isinstance(batch, dict):
            ids = batch.get("input_ids")
            if isinstance(ids, torch.Tensor):
                self._batch_shape = list(ids.shape)

    def on_stage_batch_end(
        self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        if self._profiler is None or self._stage != stage:
            return
        try:
            self._profiler.step()  # may write a cycle, and switch tracing off if that fails
            if self._profiler is not None and self._profiler.step_num >= self._planned_steps:
                self.on_stage_end(stage, trainer, pl_module)
        except Exception as error:
            self._disable(f"profiling the {stage} step failed ({error!r})")

    def on_stage_end(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._profiler is None or self._stage != stage:
            return
        profiler, self._profiler = self._profiler, None
        self._profiled_stages.add(stage)
        cut_short = profiler.step_num < self._planned_steps
        # the step stop() closes began after the last batch ended: it holds no batch
        self._stopped_early = cut_short
        profiler.stop()
        if cut_short:
            warnings.warn(
                f"Kernel trace: the {stage} run ended after {profiler.step_num} profiled batches, "
                f"before the schedule's {self._planned_steps}; {self._cycle} cycle(s) written.",
                stacklevel=2,
            )
