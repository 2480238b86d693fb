"""``last.ckpt`` holds the end of a run, also when ``max_steps`` ends it after its last validation."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class LastCheckpointAtTrainEnd(Callback):
    """Make every ``ModelCheckpoint`` with ``save_last`` write ``last.ckpt`` again when training ends past the
    step it last wrote.

    Lightning (2.6) writes ``last.ckpt`` after each validation and, at the end of training, only if it never
    wrote one: a run that ``max_steps`` stops two steps after its last validation left a ``last.ckpt`` two
    steps old, and continuing it trained those steps again. Lightning has no public switch for this; the
    callback clears the checkpoint's record of its last save (``_last_checkpoint_saved``, read by its own
    ``on_train_end``, which runs after this one: Lightning calls checkpoint callbacks last). A user-path test
    continues such a run from ``last.ckpt`` and checks its step.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            stale = getattr(callback, "_last_global_step_saved", trainer.global_step) != trainer.global_step
            if isinstance(callback, ModelCheckpoint) and callback.save_last and stale:
                callback._last_checkpoint_saved = ""
