"""Checkpoint files that are whole or absent: written beside the target, then renamed over it.

Lightning's default writer stages the file in the system's temporary folder and moves it into place,
which is a copy (not a rename) when that folder is on another file system: a kill during the copy
leaves a truncated ``last.ckpt``. Here the staging file sits in the checkpoint's own folder, so the
final step is one atomic rename, and the previous checkpoint stays loadable until it happens.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from foundation import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (remote paths keep Lightning's own way)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        protocol = get_filesystem(path).protocol
        local = "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
        if storage_options is not None or not local:
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
        return None
