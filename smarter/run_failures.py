"""Runtime failures that are not bugs (out of memory, a full disk, a lost process): one line for the user
that names the cause and what was kept, the traceback in a log file beside the run's outputs."""

from __future__ import annotations

import errno
import os
import time
import traceback
from pathlib import Path

import torch

from foundation import RunStopped


class RunFailed(RunStopped):
    """A run ended by its machine, not by its settings or by a bug: ``smarter: error: ...``, exit status 1."""


def _chain(error: BaseException):
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def failure_cause(error: BaseException) -> str | None:
    """What ended the run, in words, when it is the machine's doing; None for anything else (a bug)."""
    distributed_errors = ()
    if torch.distributed.is_available():
        distributed_errors = tuple(
            getattr(torch.distributed, name)
            for name in ("DistBackendError", "DistNetworkError", "DistStoreError")
            if hasattr(torch.distributed, name)
        )
    for link in _chain(error):
        text = str(link)
        if isinstance(link, torch.OutOfMemoryError) or "CUDA out of memory" in text:
            return "out of GPU memory"
        if isinstance(link, MemoryError):
            return "out of host memory"
        if (isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            "No space left on device" in text or "file write failed" in text
        ):
            return "the disk is full"
        lost = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted", "Broken pipe")
        if isinstance(link, distributed_errors) or any(phrase in text for phrase in lost):
            return "a process of the run was lost (its peer stopped answering)"
    return None


def latest_checkpoint(trainer) -> Path | None:
    """The newest checkpoint in the run's checkpoint folder, if one was written."""
    callback = getattr(trainer, "checkpoint_callback", None)
    folder = getattr(callback, "dirpath", None)
    if not folder:
        return None
    written = [path for path in Path(folder).glob("*.ckpt") if path.is_file()]
    return max(written, key=lambda path: path.stat().st_mtime, default=None)


def failure_log_folder(trainer) -> Path:
    """Where the traceback goes: the logger's run folder (asked without a collective), else the root folder."""
    logger = trainer.logger
    folder = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(folder or trainer.default_root_dir)


def write_failure_log(error: BaseException, folder: Path) -> Path | None:
    """The traceback of ``error`` in ``folder/smarter-error[-rankR]-<time>.log``; None if it cannot be written."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    suffix = "" if rank == "0" else f"-rank{rank}"
    path = folder / f"smarter-error{suffix}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(error)))
    except OSError:  # the disk may be the very thing that is full
        return None
    return path


def run_failed(error: BaseException, subcommand: str, trainer) -> RunFailed | None:
    """The one-line failure for ``error`` raised inside ``subcommand``, or None when it is not a runtime failure."""
    cause = failure_cause(error)
    if cause is None:
        return None
    where = f"{subcommand} at step {trainer.global_step}" if subcommand == "fit" else subcommand
    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    kept = latest_checkpoint(trainer) if subcommand == "fit" else None
    kept_text = (
        f"the last checkpoint is {kept} (continue with --ckpt_path {kept})"
        if kept
        else ("no checkpoint was written" if subcommand == "fit" else "nothing it wrote was changed")
    )
    log = write_failure_log(error, failure_log_folder(trainer))
    log_text = f"the traceback is in {log}" if log else "the traceback could not be written"
    return RunFailed(f"{cause} during {where} ({first_line[:300]}); {kept_text}; {log_text}.")
