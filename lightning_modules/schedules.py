"""Learning-rate schedules as picklable multipliers for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class WarmupCosine:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``.

    Args:
        warmup_steps: Steps of linear warm-up.
        total_steps: Steps of the whole run (warm-up included).
        min_ratio: Final multiplier of the base learning rate.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupConstant:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then constant."""

    warmup_steps: int

    def __call__(self, step: int) -> float:
        return min((step + 1) / (self.warmup_steps + 1), 1.0)
