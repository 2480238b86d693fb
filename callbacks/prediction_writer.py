"""Writes each ``predict`` result as one JSON line, as soon as it is generated."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from foundation import ConfigError, atomic_write_text, notify


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlPredictionWriter(BasePredictionWriter):
    """Append predictions to a JSON Lines file (prompt, completion, timings) after every batch.

    With several processes (``predict`` under DDP splits the prompts), each process appends to its own
    part file beside the target as it goes, and when all are done the first process merges the parts
    into the target in prompt order and removes them: every prediction is kept, once. A run stopped by a
    signal merges what every process wrote up to the batch where they all stopped.

    Args:
        output_path: File to write; unset means ``<log dir>/predictions.jsonl``. An existing file
            is never overwritten: the run stops before predicting, saying so.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.path: Path | None = None

    def target(self, trainer: L.Trainer) -> Path:
        """The file this run writes."""
        return Path(self.output_path) if self.output_path else Path(trainer.log_dir or ".") / "predictions.jsonl"

    def check_target(self, trainer: L.Trainer) -> Path:
        """Refuse an existing predictions file (before anything runs: nothing is changed)."""
        path = self.target(trainer)
        if path.exists():
            raise ConfigError(f"{path} already exists; choose another output_path or move the old file away.")
        return path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        path = self.check_target(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def _file(self, trainer: L.Trainer) -> Path:
        assert self.path is not None
        if trainer.world_size <= 1:
            return self.path
        return self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}.part")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self.path is None:
            return
        record = {k: _json_safe(v) for k, v in prediction.items() if k not in ("generated_tokens", "samples")}
        with self._file(trainer).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.merge_parts(trainer)
        if self.path is not None and trainer.is_global_zero and self.path.is_file():
            count = sum(1 for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip())
            notify(f"wrote {count} prediction{'s' * (count != 1)} to {self.path}")

    def merge_parts(self, trainer: L.Trainer) -> None:
        """With several processes: once every process has written its part, the first merges the parts into
        the target in prompt order and removes them (every process must call this: it waits for all).
        Also called when a signal stops ``predict`` (all processes stop after the same batch)."""
        if self.path is None or trainer.world_size <= 1:
            return
        trainer.strategy.barrier("smarter-predictions")
        if trainer.is_global_zero:
            parts = sorted(self.path.parent.glob(f"{self.path.name}.rank*.part"))
            records = [json.loads(line) for part in parts for line in part.read_text(encoding="utf-8").splitlines()]
            records.sort(key=lambda record: record.get("index", 0))
            text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            atomic_write_text(self.path, text)
            for part in parts:
                part.unlink()
        trainer.strategy.barrier("smarter-predictions-merged")
