"""Users' extensions for the tests: module subclasses, and callbacks / plugins that interrupt a run."""

from __future__ import annotations

import dataclasses
import io
import os
import signal

import lightning as L
import torch

from callbacks import AtomicCheckpointIO
from lightning_modules import MistralModule


class ZLossMistralModule(MistralModule):
    """Adds PaLM's z-loss (``coef * logsumexp(logits)^2``) to the training loss.

    Args:
        z_loss_coef: Weight of the z-loss term.
        **kwargs: Everything ``MistralModule`` takes.
    """

    def __init__(self, z_loss_coef: float = 1e-4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.z_loss_coef = z_loss_coef
        self.z_loss_steps = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        logits = self(batch["input_ids"])  # (batch, seq, vocab)
        z_loss = self.z_loss_coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        self.log("train/z_loss", z_loss)
        self.z_loss_steps += 1
        return loss + z_loss


class OutOfMemoryMistralModule(MistralModule):
    """Fails to build its model the way a too-large variant does on a full GPU."""

    def build_model(self, device: torch.device) -> torch.nn.Module:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 GiB")


class DeferredDivergenceCheck(MistralModule):
    """Trains with the plan a CUDA GPU gets (the fused AdamW, the divergence verdict read a step later) on any
    device, so that the deferred check runs on a CPU too."""

    def _plan_for(self, stage, where):
        plan = super()._plan_for(stage, where)
        if stage != "fit":
            return plan
        return dataclasses.replace(plan, optimizer_kernel="fused", divergence_check="deferred")


class SignalAtStep(L.Callback):
    """Sends a signal to this process after a given training step, or a given validate or predict batch.

    Args:
        step: Training step after which to send it (``global_step``).
        predict_batch: Predict batch index after which to send it.
        validate_batch: Validation batch index after which to send it (a stop applies in ``validate``; fit's
            validation batches never stop a run).
        signum: The signal (15 is SIGTERM, 2 is SIGINT).
        rank: Only the process of this rank gets it (-1: every process).
        train_batch: Training batch (counted from 1 over the run) after which to send it.
    """

    def __init__(
        self,
        step: int = -1,
        predict_batch: int = -1,
        signum: int = 15,
        rank: int = -1,
        validate_batch: int = -1,
        train_batch: int = -1,
    ) -> None:
        self.step, self.predict_batch, self.signum, self.rank = step, predict_batch, signum, rank
        self.validate_batch, self.train_batch, self.train_batches = validate_batch, train_batch, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_batches += 1
        now = trainer.global_step == self.step or self.train_batches == self.train_batch
        if now and self.rank in (-1, trainer.global_rank):
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.validate_batch and self.rank in (-1, trainer.global_rank):
            os.kill(os.getpid(), self.signum)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.predict_batch and self.rank in (-1, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class FailAtStep(L.Callback):
    """Raises, after a given training step, the error a failing machine raises.

    Args:
        step: Training step after which to raise (``global_step``).
        failure: ``out-of-memory`` (CUDA out of memory), ``disk-full`` (no space left on device) or ``bug``.
    """

    def __init__(self, step: int = 3, failure: str = "out-of-memory") -> None:
        self.step, self.failure = step, failure

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.failure == "out-of-memory":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.failure == "disk-full":
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        raise ZeroDivisionError("a bug in the user's callback")


class KilledWhileSaving(AtomicCheckpointIO):
    """Writes the first checkpoint, then dies by SIGKILL halfway through writing the second."""

    saves = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        KilledWhileSaving.saves += 1
        if KilledWhileSaving.saves < 2:
            return super().save_checkpoint(checkpoint, path, storage_options)
        real_save = torch.save

        def half_then_die(obj, target, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(target, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_then_die
        return super().save_checkpoint(checkpoint, path, storage_options)


class RecordTrainingRows(L.Callback):
    """Writes, per process, a digest of every scored training row it trains on (padding rows left out),
    and, under DDP, whether DDP was built with a static graph (``static-graph-rank<N>.txt``) and the
    ``NCCL_P2P_DISABLE`` the process had when training started (``nccl-p2p-disable-rank<N>.txt``).

    Args:
        folder: Where each process writes ``rank<N>.txt``.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module) -> None:
        static = getattr(trainer.strategy.model, "static_graph", None)
        if static is not None:
            with open(os.path.join(self.folder, f"static-graph-rank{trainer.global_rank}.txt"), "w") as handle:
                handle.write(str(static))
            with open(os.path.join(self.folder, f"nccl-p2p-disable-rank{trainer.global_rank}.txt"), "w") as handle:
                handle.write(os.environ.get("NCCL_P2P_DISABLE", "unset"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import hashlib

        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.txt"), "a") as handle:
            for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
                if (labels != -100).any():
                    handle.write(hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest() + "\n")
