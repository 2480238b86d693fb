"""The ground floor every other package stands on: the error type, the cache folder, device sync,
atomic file writes, stage names and the label that marks a position as not scored.

It imports nothing from this project, so ``lightning_modules``, ``datamodules``, ``callbacks`` and the
``smarter`` command can all depend on it without depending on each other.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

# ---- errors ------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """Bad configuration or input, caught before work starts; the message names the fix.

    Libraries that build our objects (jsonargparse inside LightningCLI) may re-raise it as their
    own exception with the message folded into a longer text; ``find_config_error`` recovers it.
    """

    _recent: ClassVar[weakref.WeakSet[ConfigError]] = weakref.WeakSet()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        ConfigError._recent.add(self)


class RunStopped(Exception):
    """A run that stopped before its end for a reason the user must read (not a bug in the framework).

    ``exit_code`` is the command's exit status; ``label`` leads the one-line message.
    """

    exit_code = 1
    label = "error"


class TrainingDiverged(RunStopped):
    """The loss or the gradient norm stopped being finite."""

    exit_code = 3


class RunInterrupted(RunStopped):
    """A signal (SIGTERM, SIGINT) asked the run to stop; it stopped at a clean point.

    Args:
        message: What was kept and how to go on.
        signum: The signal; the exit status is ``128 + signum``, as a shell reports a signal.
    """

    label = "stopped"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def find_config_error(error: BaseException) -> ConfigError | None:
    """The ``ConfigError`` behind ``error``: itself, one in its cause chain, or one whose message it embeds."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    text = str(error)
    embedded = [candidate for candidate in list(ConfigError._recent) if str(candidate) and str(candidate) in text]
    return max(embedded, key=lambda candidate: len(str(candidate)), default=None)


def is_global_zero() -> bool:
    """Whether this process is the first of its run (or the only one)."""
    return (
        os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    )


def notify(message: str) -> None:
    """Tell the user something they must know (once per run, on the first process): ``smarter: note: ...``."""
    if is_global_zero():
        print(f"smarter: note: {message}", file=sys.stderr, flush=True)


# ---- cache folder --------------------------------------------------------------------------------

CACHE_DIR_ENV = "SMARTER_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/scaling-smarter"
# how an error names the cache folder when no option set it
CACHE_FOLDER_SETTING = f"the cache folder (${CACHE_DIR_ENV}, or {DEFAULT_CACHE_DIR})"


def cache_folder(override: str | os.PathLike | None = None) -> Path:
    """The cache folder (downloaded book, token tensors, preset weights).

    Args:
        override: An explicit folder; unset means ``$SMARTER_CACHE_DIR`` or ``~/.cache/scaling-smarter``.
    """
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)).expanduser()


# ---- devices -------------------------------------------------------------------------------------

GIB = 1024**3


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work on ``device`` (a no-op on CPU), so a host clock reads finished work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def host_rss_gib() -> float:
    """Current resident memory of this process (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize() / GIB
    except OSError:
        return peak_host_rss_gib()


def peak_host_rss_gib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def check_writable_folder(path: str | os.PathLike, option: str) -> None:
    """Refuse a folder that could not be created or written, without creating anything.

    Args:
        path: The folder a run will write into (it need not exist yet).
        option: The setting that names it, for the message.
    """
    folder = Path(path).expanduser()
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option}={str(path)!r} cannot be created: {existing} is a file; choose another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}={str(path)!r} is not writable ({existing} refuses writes); choose another folder.")


# ---- atomic writes -------------------------------------------------------------------------------


def _staging_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path; on success it replaces ``path`` in one rename, on failure it is removed.

    A reader never sees a half-written file or folder, and a crash leaves the old one intact.
    Works for files and folders (a folder replaces an existing one as a whole).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_path(target)
    _remove(staging)
    try:
        yield staging
        if staging.is_dir() and target.is_dir():
            retired = target.with_name(f".{target.name}.{os.getpid()}.old")
            _remove(retired)
            os.replace(target, retired)
            os.replace(staging, target)
            _remove(retired)
        else:
            os.replace(staging, target)
    finally:
        _remove(staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    with atomic_path(path) as staging:
        torch.save(obj, staging)
    return Path(path)


@contextmanager
def held_lock(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, or refuse at once if another process holds it.

    The lock is the operating system's (``flock``): it goes when its process does, however it ends.

    Args:
        path: The lock file (created if missing; it holds the owner's pid).
        what: What the lock protects, for the message.
        wait: Wait for another holder to finish instead of refusing.
    """
    import fcntl

    lock_file = Path(path)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise ConfigError(f"{what} is in use by {owner}; wait for it to finish or stop it.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- stages and labels ---------------------------------------------------------------------------

Stage = Literal["train", "val", "test", "predict"]
STAGES: tuple[Stage, ...] = ("train", "val", "test", "predict")
# Lightning's trainer functions and the stage each one runs (``fit`` trains; its validation is ``val``).
STAGE_OF_TRAINER_FN: dict[str, Stage] = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}

# A label with this value marks a position that is not scored (padding, context already scored).
IGNORE_INDEX = -100
