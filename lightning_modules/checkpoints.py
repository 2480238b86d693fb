"""Reading checkpoints safely and deciding whether one fits the configured model.

- ``read_checkpoint`` loads with ``weights_only=True`` (no code runs from the file) and turns every way a
  file can be wrong (missing, a folder, truncated, not PyTorch, not written by this framework) into a
  one-line ``ConfigError``;
- ``setting_differences`` compares the model settings a checkpoint was trained with against the ones
  configured now: a difference that changes what the weights mean is refused, any other is reported
  (the configured value is used; nothing is taken from the checkpoint silently);
- ``capture_rng_state`` / ``restore_rng_state`` carry the random generators across a resume, so dropout
  draws the same masks as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from foundation import ConfigError

# Settings that decide what the saved weights are: a checkpoint trained otherwise is another model.
WEIGHT_DEFINING = ("source", "preset_overrides", "preset_seed")
LORA_WEIGHT_DEFINING = ("r", "alpha", "target_modules")
# Settings that never matter for resuming.
IGNORED = {"cache_dir", "_instantiator", "_class_path", "model_requirements"}


def read_checkpoint(path: str | os.PathLike, what: str = "ckpt_path") -> dict[str, Any]:
    """Load a Lightning checkpoint written by this framework, safely, or explain in one line why not."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(f"{what}={str(path)!r} does not exist; give the path of a .ckpt file.")
    if file.is_dir():
        raise ConfigError(
            f"{what}={str(path)!r} is a folder; give the .ckpt file inside it (e.g. checkpoints/last.ckpt)."
        )
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe is None:
            raise ConfigError(
                f"{what}={str(path)!r} is not a readable checkpoint ({type(error).__name__}); "
                "give a complete .ckpt written by `smarter fit`."
            ) from None
        raise ConfigError(
            f"{what}={str(path)!r} holds an object of type {unsafe.group(1)}, which is not loaded without running "
            "code from the file (weights_only); give a checkpoint written by `smarter fit`."
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConfigError(
            f"{what}={str(path)!r} is not a readable checkpoint (truncated, or not a PyTorch file: "
            f"{type(error).__name__}); give a complete .ckpt written by `smarter fit`."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{what}={str(path)!r} is not a Lightning checkpoint (no state_dict); give a .ckpt file.")
    if not checkpoint.get("hyper_parameters"):
        raise ConfigError(
            f"{what}={str(path)!r} holds no model settings (hyper_parameters), so it was not written by "
            "`smarter fit`; this framework cannot tell which model it belongs to."
        )
    return checkpoint


def _plain(value: Any) -> Any:
    """Dataclasses as dicts, tuples as lists: values as a config file would hold them."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same_source(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).expanduser().exists():
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def setting_differences(configured: dict[str, Any], saved: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refusals, notes): how a checkpoint's model settings differ from the configured ones.

    Refusals are differences in what the weights are (the model's source and shape, the LoRA rank,
    scale and targets); notes are every other difference, for which the configured value is used.
    """
    configured, saved = _plain(dict(configured)), _plain(dict(saved))
    refusals, notes = [], []
    for key in sorted((set(configured) | set(saved)) - IGNORED):
        here, there = configured.get(key), saved.get(key)
        if key == "lora":
            if (here is None) != (there is None):
                refusals.append(f"model.lora is {there} in the checkpoint and {here} here")
                continue
            for sub in sorted(set(here or {}) | set(there or {})):
                a, b = (here or {}).get(sub), (there or {}).get(sub)
                if a != b:
                    target = refusals if sub in LORA_WEIGHT_DEFINING else notes
                    target.append(f"model.lora.{sub} is {b} in the checkpoint and {a} here")
            continue
        if key == "source" and _same_source(here, there):
            continue
        if here != there:
            target = refusals if key in WEIGHT_DEFINING else notes
            target.append(f"model.{key} is {there!r} in the checkpoint and {here!r} here")
    if configured.get("lora") is None and saved.get("lora") is None:
        # a full fine-tune holds every weight: its seed no longer matters
        refusals = [r for r in refusals if not r.startswith("model.preset_seed")]
    return refusals, notes


def refusal_message(path: str, refusals: list[str]) -> str:
    return (
        f"The checkpoint {path} does not fit the configured model: {'; '.join(refusals)}. Configure the "
        "model it was trained with (its run folder's config.yaml holds it: -c .../config.yaml) or give "
        "another checkpoint."
    )


def capture_rng_state() -> dict[str, Any]:
    """The torch random generators (CPU, and every CUDA device), to store in a checkpoint."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back generators saved by ``capture_rng_state`` (CUDA ones only where the device count matches)."""
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def record_unfinished_epoch(checkpoint: dict[str, Any], trainer) -> None:
    """Mark, in a checkpoint written when ``fit`` stops before its epoch's last batch (``max_steps`` reached
    mid-epoch), that epoch as unfinished, so that continuing the run (``--ckpt_path`` with a larger
    ``max_steps``) takes the epoch's next batch, not a fresh epoch.

    Lightning (2.6) counts the epoch as processed and completed once ``max_steps`` stops it, and a resume
    then starts the next epoch with a new shuffle: the continued run left the uninterrupted one's losses.
    The counters here are those of Lightning's own mid-epoch checkpoints (its loop state layout; no public
    API sets it); a test resumes such a checkpoint and compares the losses.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    if progress is None or not 0 < batches_done < trainer.num_training_batches:
        return
    if progress["total"]["processed"] < progress["total"]["started"]:
        return  # written mid-epoch: already unfinished
    for counts in (progress["total"], progress["current"]):
        counts["processed"] = counts["completed"] = counts["started"] - 1
    checkpoint["epoch"] = progress["current"]["completed"]
