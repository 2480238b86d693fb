"""One callback base that folds Lightning's per-stage hooks into four hooks that take a stage name.

Lightning has a start / batch start / batch end / end hook for each of train, validation, test and
predict. Callbacks that do the same thing in every stage (timing, tracing) subclass ``StageCallback``
and implement the four ``on_stage_*`` hooks once. Validation runs as stage ``val`` both in
``validate`` and inside ``fit``; the sanity check before training is never reported.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from foundation import Stage


class StageCallback(Callback):
    """Base for callbacks that act per stage (``train``, ``val``, ``test``, ``predict``)."""

    def on_stage_start(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A stage's loop begins."""

    def on_stage_batch_start(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """A batch of ``stage`` is about to run."""

    def on_stage_batch_end(
        self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        """A batch of ``stage`` has run (``outputs`` is what its step returned)."""

    def on_stage_end(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A stage's loop has ended."""

    # ---- Lightning's hooks, each forwarded once -------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.on_stage_start("train", trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.on_stage_batch_start("train", trainer, pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.on_stage_batch_end("train", trainer, pl_module, outputs, batch)

    def on_train_end(self, trainer, pl_module) -> None:
        self.on_stage_end("train", trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.on_stage_start("val", trainer, pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.on_stage_batch_start("val", trainer, pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.on_stage_batch_end("val", trainer, pl_module, outputs, batch)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.on_stage_end("val", trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self.on_stage_start("test", trainer, pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_stage_batch_start("test", trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_stage_batch_end("test", trainer, pl_module, outputs, batch)

    def on_test_end(self, trainer, pl_module) -> None:
        self.on_stage_end("test", trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self.on_stage_start("predict", trainer, pl_module)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_stage_batch_start("predict", trainer, pl_module, batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_stage_batch_end("predict", trainer, pl_module, outputs, batch)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.on_stage_end("predict", trainer, pl_module)
