"""A user's subclass of the LightningModule, used to check that subclasses run through the CLI."""

from __future__ import annotations

import torch

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
