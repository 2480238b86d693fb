"""Throughput, MFU and memory for every stage, logged under ``perf/<stage>/...``.

Each batch is timed between its start and end hooks with the GPU synchronized at both ends, so the
time covers the whole step (``tokens_per_s``); ``wall_tokens_per_s`` also counts the time between
batches (loading, logging, waiting for other processes), which is what a run sees as a whole.
Tokens are the scored ones (``labels != IGNORE_INDEX``: padding, and the prompts of instruction data,
are not counted), or generated tokens for predict when the module reports them; ``input_tokens_per_s``
counts every position the model computes (the row length times the batch), and the FLOPs behind
``tflops_per_s`` and MFU are counted over those positions, which is the work done. The first ``warmup_steps``
batches of each stage are left out of the stage totals (compilation, allocator growth, caches).
Validation inside ``fit`` is timed as stage ``val`` too; its memory figures are left out, since the
peak belongs to training.

Lightning's ``ThroughputMonitor`` logs under its own key scheme and does not log in predict; this
callback keeps one scheme for all four stages and also reports memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from callbacks.flops import flops_per_token, peak_tflops_for
from callbacks.stage_hooks import StageCallback
from foundation import GIB, IGNORE_INDEX, ConfigError, Stage, host_rss_gib, synchronize


@dataclass
class StageCounters:
    """Running totals of one stage, warm-up batches excluded, and what the FLOPs count depends on."""

    mode: str = "inference"
    lora_weights: int = 0
    nested: bool = False
    steps: int = 0
    seen: int = 0
    tokens: int = 0
    positions: int = 0
    samples: int = 0
    seconds: float = 0.0
    between_s: float = 0.0  # time between consecutive timed batches of this stage, no other stage in it
    last_end: float | None = None
    flops: float = 0.0


class ThroughputMemoryCallback(StageCallback):
    """Tokens/s, samples/s, model TFLOP/s and MFU, step time, and GPU / host memory per stage.

    Args:
        warmup_steps: Batches per stage left out of the totals.
        peak_tflops: Peak TFLOP/s of one device for MFU; unset picks the dense bf16 peak for known
            GPUs (H100/H200: 989) and logs no MFU elsewhere.
        log_every_n_steps: Log per-step figures every N batches (stage totals are always logged).
    """

    def __init__(self, warmup_steps: int = 2, peak_tflops: float | None = None, log_every_n_steps: int = 10):
        super().__init__()
        if warmup_steps < 0:
            raise ConfigError(f"throughput: warmup_steps must be >= 0, got {warmup_steps}.")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ConfigError(f"throughput: peak_tflops must be > 0, got {peak_tflops}.")
        if log_every_n_steps < 1:
            raise ConfigError(f"throughput: log_every_n_steps must be >= 1, got {log_every_n_steps}.")
        self.warmup_steps = warmup_steps
        self.peak_tflops = peak_tflops
        self.log_every_n_steps = log_every_n_steps
        self.counters: dict[str, StageCounters] = {}
        self.summary: dict[str, dict[str, float]] = {}
        self._t0: float | None = None
        self._start_allocated_gib = 0.0

    # ---- helpers -------------------------------------------------------------------------
    def _peak(self, pl_module: L.LightningModule) -> float | None:
        if self.peak_tflops is not None:
            return self.peak_tflops
        if pl_module.device.type == "cuda":
            return peak_tflops_for(torch.cuda.get_device_name(pl_module.device))
        return None

    @staticmethod
    def _mode(stage: str, pl_module: L.LightningModule) -> str:
        if stage != "train":
            return "inference"
        spec = getattr(pl_module, "spec", None)
        return "train-lora" if spec is not None and spec.lora is not None else "train-full"

    @staticmethod
    def _lora_weights(pl_module: L.LightningModule) -> int:
        model = getattr(pl_module, "model", None)
        if model is None:
            return 0
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    @staticmethod
    def _batch_work(batch: Any, outputs: Any) -> tuple[int, int, int, int]:
        """(scored tokens, samples, sequence length, positions computed) of a batch."""
        if isinstance(outputs, dict) and "generated_tokens" in outputs:
            generated = int(outputs["generated_tokens"])
            return generated, int(outputs.get("samples", 1)), int(outputs.get("seq_len", 1)), generated
        if isinstance(batch, dict) and "input_ids" in batch:
            ids = batch["input_ids"]
            labels = batch.get("labels")
            tokens = int((labels != IGNORE_INDEX).sum()) if labels is not None else ids.numel()
            return tokens, ids.shape[0], ids.shape[-1], ids.numel()
        return 0, 0, 0, 0

    def _log(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ---- stage hooks ---------------------------------------------------------------------
    def on_stage_start(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        nested = any(other != stage for other in self.counters)  # validation inside fit
        for outer in self.counters.values():  # the nested stage's time is not the outer one's gap
            outer.last_end = None
        self.counters[stage] = StageCounters(
            mode=self._mode(stage, pl_module), lora_weights=self._lora_weights(pl_module), nested=nested
        )
        if pl_module.device.type == "cuda" and not nested:
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._start_allocated_gib = torch.cuda.memory_allocated(pl_module.device) / GIB

    def on_stage_end(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counters = self.counters.pop(stage, None)
        if counters is None:
            return
        result: dict[str, float] = {"host_rss_gib": host_rss_gib()}
        (tokens, positions, samples, flops, seconds, steps, wall), every = self._whole_run(trainer, pl_module, counters)
        world = max(trainer.world_size, 1)
        if seconds > 0:
            result.update(
                tokens_per_s=tokens / seconds,  # the whole run: every process's tokens over the slowest's time
                wall_tokens_per_s=tokens / wall,
                tokens_per_s_per_device=tokens / seconds / world,
                input_tokens_per_s=positions / seconds,
                samples_per_s=samples / seconds,
                step_time_ms=1000 * seconds / max(steps, 1),
                tflops_per_s=flops / seconds / 1e12,
            )
            peak = self._peak(pl_module)
            if peak:
                result["mfu"] = result["tflops_per_s"] / (peak * world)
        if pl_module.device.type == "cuda" and not counters.nested:
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / GIB
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / GIB
            result["allocated_at_start_gib"] = self._start_allocated_gib  # weights and state before any batch
        result["timed_steps"] = float(steps)
        result["devices"] = float(world)
        if world > 1:  # each process's own step and between-step times: where a process waits for another
            for rank, (*_, rank_seconds, rank_steps, rank_wall) in enumerate(every):
                result[f"step_time_ms_rank{rank}"] = 1000 * rank_seconds / max(rank_steps, 1)
                result[f"between_steps_ms_rank{rank}"] = 1000 * (rank_wall - rank_seconds) / max(rank_steps, 1)
        self.summary[stage] = result
        self._log(trainer, {f"perf/{stage}/{k}": v for k, v in result.items()}, step=trainer.global_step)

    @staticmethod
    def _whole_run(trainer: L.Trainer, pl_module: L.LightningModule, counters: StageCounters):
        """(tokens, positions, samples, FLOPs, seconds, steps, wall seconds) of the whole run: sums over processes,
        the slowest process's times; and the same seven figures of each process."""
        wall = counters.seconds + counters.between_s
        mine = [
            counters.tokens,
            counters.positions,
            counters.samples,
            counters.flops,
            counters.seconds,
            counters.steps,
            wall,
        ]
        if trainer.world_size <= 1:
            return mine, [mine]
        local = torch.tensor(mine, dtype=torch.float64, device=pl_module.device)
        every = trainer.strategy.all_gather(local).reshape(trainer.world_size, len(mine))  # (processes, 7)
        totals, slowest = every.sum(dim=0).tolist(), every.max(dim=0).values.tolist()
        # summed tokens, positions, samples, FLOPs; the slowest seconds, steps, wall
        return [*totals[:4], *slowest[4:]], every.tolist()

    def on_stage_batch_start(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        if stage not in self.counters:
            return
        synchronize(pl_module.device)
        self._t0 = time.perf_counter()
        counters = self.counters[stage]
        if counters.last_end is not None:
            counters.between_s += self._t0 - counters.last_end

    def on_stage_batch_end(
        self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        if self._t0 is None or stage not in self.counters:
            return
        synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._t0
        self._t0 = None
        counters = self.counters[stage]
        counters.seen += 1
        tokens, samples, seq_len, positions = self._batch_work(batch, outputs)
        config = getattr(pl_module, "model_config", None)
        flops = 0.0
        if config is not None and seq_len:
            flops = positions * flops_per_token(config, seq_len, counters.mode, counters.lora_weights)
        counters.last_end = time.perf_counter() if counters.seen >= self.warmup_steps else None
        if counters.seen <= self.warmup_steps:
            return
        counters.steps += 1
        counters.tokens += tokens
        counters.positions += positions
        counters.samples += samples
        counters.seconds += elapsed
        counters.flops += flops
        if counters.steps % self.log_every_n_steps == 0:
            step_metrics = {
                f"perf/{stage}/step_tokens_per_s": tokens / elapsed if elapsed else 0.0,
                f"perf/{stage}/step_time_ms": 1000 * elapsed,
            }
            self._log(trainer, step_metrics, step=trainer.global_step if stage == "train" else counters.seen)
