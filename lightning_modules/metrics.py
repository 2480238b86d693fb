"""Token-weighted language-modelling metrics, exact over a whole split and across processes."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class TokenNLLMetric(Metric):
    """Sums of token NLL, scored tokens and scored bytes; reduced by sum across processes.

    ``compute`` gives the split's mean token NLL, perplexity ``exp(sum NLL / tokens)`` (never a
    mean of batch means) and tokenizer-independent bits per UTF-8 byte of the scored text.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bytes", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _apply(self, fn, exclude_state=""):
        # Lightning's half "true" precisions call module.to(torch.bfloat16), which torchmetrics applies to
        # the states too: the NLL sum would then round to 8 significant bits. Only its device may change.
        this = super()._apply(fn, exclude_state)
        if this.nll_sum.dtype != torch.float64:
            this.nll_sum = this.nll_sum.to(torch.float64)
            this._defaults["nll_sum"] = this._defaults["nll_sum"].to(torch.float64)
        return this

    def update(self, nll_sum: torch.Tensor, tokens: torch.Tensor, scored_bytes: torch.Tensor) -> None:
        """Add one batch.

        Args:
            nll_sum: Summed NLL (nats) of the batch's scored tokens.
            tokens: Number of scored tokens.
            scored_bytes: UTF-8 bytes those tokens stand for.
        """
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.tokens += tokens.detach().long()
        self.bytes += scored_bytes.detach().long()

    def compute(self) -> dict[str, torch.Tensor]:
        if int(self.tokens) == 0:
            raise RuntimeError("No token was scored: the evaluation split is empty.")
        mean_nll = self.nll_sum / self.tokens
        bits_per_byte = self.nll_sum / math.log(2) / self.bytes.clamp_min(1)
        return {"loss": mean_nll, "ppl": torch.exp(mean_nll), "bits_per_byte": bits_per_byte}
