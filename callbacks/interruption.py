"""SIGTERM or SIGINT stops a run at the next clean point and keeps what it made.

- ``fit``: after the current optimizer step (with gradient accumulation, at the end of the batches that
  make it up: a checkpoint holds no half-summed gradients), a checkpoint is written atomically
  (``interrupted-step<N>.ckpt`` in the checkpoint folder), its path is printed, and the run exits with
  ``128 + signal``. Resuming from it with ``--ckpt_path`` continues exactly (data order, schedule,
  random generators).
- ``validate`` / ``test`` / ``predict``: after the current batch; predictions already written are kept.
  With several processes, all stop after the same batch (as in training), and predict merges what they
  wrote into the one predictions file.

With several processes, a signal that reaches any of them stops all of them at the same step (in
training, one step after it arrives: the processes' flags travel in an all-reduce over a CPU process
group, started at one step's end and read at the next, so no step waits on the GPU or on a barrier for
it). A second signal while stopping aborts at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch

from callbacks.stage_hooks import StageCallback
from foundation import RunInterrupted, Stage

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# the trainer's count of this process's batches, per stage that runs on its own (not inside fit)
_BATCH_COUNTS = {"val": "num_val_batches", "test": "num_test_batches", "predict": "num_predict_batches"}


def _fitting(trainer: L.Trainer) -> bool:
    return getattr(trainer.state.fn, "value", None) == "fit"


def _inside_accumulation_window(trainer: L.Trainer) -> bool:
    """Whether the training batch that just ended left its gradients for the next batches to add to (no
    optimizer step after it). Lightning's epoch loop keeps the rule; both released 2.x lines have it."""
    should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    return bool(should_accumulate()) if should_accumulate is not None else False


def checkpoint_folder(trainer: L.Trainer) -> Path:
    """Where this run's checkpoints go: the checkpoint callback's folder, else ``<log dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


def _unused(path: Path) -> Path:
    """``path``, or with ``-v1``, ``-v2``, ... before its suffix where an earlier run left that file (a pinned
    logger version, or no logger: runs share a checkpoint folder)."""
    candidate, version = path, 0
    while candidate.exists():
        version += 1
        candidate = path.with_name(f"{path.stem}-v{version}{path.suffix}")
    return candidate


class StopOnSignal(StageCallback):
    """Turn SIGTERM / SIGINT into a clean stop (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None  # a CPU (gloo) process group for the processes' stop flags
        self._pending: tuple[Any, torch.Tensor] | None = None  # the all-reduce started at the last step
        self._common_batches = 0  # validate, test, predict: the batches every process has
        self._batches_seen = 0
        self._stop_at_step_end = False  # fit: stop agreed in the middle of an accumulation window

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now
            self._restore_handlers()
            raise KeyboardInterrupt
        self.received = signum

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.received = None
        self._pending = None
        self._stop_at_step_end = False
        if trainer.world_size > 1 and self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")  # every process takes this hook
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def on_stage_start(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning puts its own SIGTERM handler in front of this one after the setup hooks. Under DDP it
        # kills the other processes from the first one, and it broadcasts from inside the handler, which
        # hangs the run when one process alone gets the signal. This one goes back on top for the run.
        if self._previous and threading.current_thread() is threading.main_thread():
            for signum in HANDLED_SIGNALS:
                if signal.getsignal(signum) != self._on_signal:
                    signal.signal(signum, self._on_signal)
        if stage in _BATCH_COUNTS and not _fitting(trainer) and trainer.world_size > 1 and self._group is not None:
            # the data may split unevenly by a batch: over the batches all processes have, they stop together
            batches = torch.tensor([int(sum(getattr(trainer, _BATCH_COUNTS[stage])))])
            torch.distributed.all_reduce(batches, op=torch.distributed.ReduceOp.MIN, group=self._group)
            self._common_batches, self._batches_seen, self._pending = int(batches.item()), 0, None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._pending is not None:  # every process started it: let it finish
            self._pending[0].wait()
            self._pending = None
        self._restore_handlers()

    def _stop_requested(self, trainer: L.Trainer, stage: Stage) -> bool:
        # every process stops together, whichever one got the signal: in training (their batches are in
        # step), and in validate, test and predict over the batches every process has (predict's part
        # files are then merged; a process's one extra batch is its last anyway)
        if trainer.world_size > 1 and stage == "train":
            return self._agreed_stop()
        if trainer.world_size > 1 and stage in _BATCH_COUNTS:
            if self._batches_seen >= self._common_batches:  # this process's one extra batch: its last, done
                return False
            self._batches_seen += 1
            return self._agreed_stop(send_next=self._batches_seen < self._common_batches)
        return self.received is not None

    def _agreed_stop(self, send_next: bool = True) -> bool:
        """Whether any process had a signal at the previous step's end (the same answer on every process);
        then, unless this is the last step all processes have, this step's flags are sent on their way."""
        stop = False
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            stop = bool(flags.item())
        self._pending = None
        if not stop and send_next:
            flags = torch.tensor([int(self.received is not None)])
            self._pending = (torch.distributed.all_reduce(flags, group=self._group, async_op=True), flags)
        return stop

    def on_stage_batch_end(
        self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        if _fitting(trainer) and stage != "train":
            return
        if stage == "train":
            if not (self._stop_at_step_end or self._stop_requested(trainer, stage)):
                return
            # a batch whose gradients wait for the next ones (accumulation) has not stepped the optimizer:
            # a checkpoint here would lose them, and the resumed run would step on the rest alone
            self._stop_at_step_end = _inside_accumulation_window(trainer)
            if self._stop_at_step_end:
                return
        elif not self._stop_requested(trainer, stage):
            return
        signum = self.received or signal.SIGTERM
        name = signal.Signals(signum).name
        if stage == "train":
            path = _unused(checkpoint_folder(trainer) / f"interrupted-step{trainer.global_step}.ckpt")
            path = trainer.strategy.broadcast(path)  # the first process's choice (it writes the file)
            trainer.save_checkpoint(path)
            # what Lightning does right after these hooks, so this last step's metrics reach the loggers
            # (private: Lightning has no public call to flush a step's logged metrics from a callback;
            # tests/test_private_apis.py fails if these methods change)
            trainer._logger_connector.on_batch_end()
            trainer._logger_connector.update_train_step_metrics()
            raise RunInterrupted(
                f"{name} received: stopped after step {trainer.global_step}; checkpoint written to {path}. "
                f"Resume with the same command and --ckpt_path {path}",
                signum,
            )
        kept = "what it wrote is kept"
        if stage == "predict":
            from callbacks.prediction_writer import JsonlPredictionWriter

            for writer in trainer.callbacks:
                if isinstance(writer, JsonlPredictionWriter) and writer.path is not None:
                    writer.merge_parts(trainer)  # with several processes, all are here after the same batch
                    kept = f"the predictions so far are in {writer.path}"
        command = "validate" if stage == "val" else stage
        raise RunInterrupted(f"{name} received: {command} stopped after the current batch; {kept}.", signum)
