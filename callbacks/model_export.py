"""When ``fit`` ends normally, write the trained model where it can be used without this framework."""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from foundation import ConfigError, notify
from lightning_modules import export_trained_model


class ExportAtFitEnd(Callback):
    """Export the trained model when ``fit`` completes (not when it is interrupted or diverges).

    Writes ``adapter/`` (PEFT) for LoRA runs, plus ``merged/`` when asked, or ``model/`` for a full
    fine-tune; ``smarter export`` writes the same from any checkpoint.

    Args:
        output_dir: Folder to write; unset means ``<log dir>/export``. An existing folder is never
            overwritten: the run refuses to start.
        merged: Also write the adapter merged into its (dequantized) base.
    """

    def __init__(self, output_dir: str | None = None, merged: bool = False) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.merged = merged
        self.written: list[Path] = []

    def folder(self, trainer: L.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "export"

    def check_target(self, trainer: L.Trainer) -> None:
        """Refuse an existing export folder before anything runs (nothing is changed): ``output_dir``, or
        ``<log dir>/export`` left by an earlier run of the same log folder (a pinned logger version, or no
        logger: every such run logs in ``default_root_dir``)."""
        folder = self.folder(trainer)
        if not folder.exists():
            return
        if self.output_dir:
            raise ConfigError(
                f"export output_dir {self.output_dir} already exists; choose another folder or move it away."
            )
        where = "trainer.logger's version" if trainer.loggers else "trainer.default_root_dir (the logger is off)"
        raise ConfigError(
            f"{folder} already exists: an earlier run of this log folder exported there; set another {where}, "
            "or move it away."
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_target(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self.folder(trainer)  # every process: the log folder is agreed on collectively
        with self._whole_weights(trainer):
            if trainer.is_global_zero:
                self.written = export_trained_model(
                    pl_module.model, pl_module.spec, folder, merged=self.merged, global_step=trainer.global_step
                )
                notify(f"exported the trained model to {', '.join(str(p) for p in self.written)}")
            trainer.strategy.barrier("smarter-export")

    @staticmethod
    def _whole_weights(trainer: L.Trainer):
        """Under FSDP, every process gathers the full weights for the export (a collective step)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if not isinstance(trainer.strategy, FSDPStrategy):
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
