"""Which variant to fine-tune, by a stated rule, and the ``smarter fit`` command that fine-tunes it."""

from __future__ import annotations

import shlex
from pathlib import Path

from smarter.study.records import VariantResult
from smarter.study.settings import REPO_CONFIGS, resolve_variant

FINETUNE_RECIPE = REPO_CONFIGS / "finetune" / "lora.yaml"


def choose_best(results: list[VariantResult], reference: str, tolerance: float) -> tuple[VariantResult | None, str]:
    """The variant to fine-tune and the rule that picked it.

    The rule: the fastest batch-1 decode (the better of the eager and the fast decoder) among finished
    variants whose held-out perplexity is within
    ``tolerance`` (a fraction) of the reference's; less peak memory breaks ties. Without a finished
    reference there is no perplexity limit.
    """
    finished = [r for r in results if r.ok and r.best_decode_tokens_per_s is not None]
    ref = next((r for r in finished if r.variant == reference and r.value("val_ppl") is not None), None)
    if ref is not None:
        limit = ref.val_ppl * (1 + tolerance)
        qualifying = [r for r in finished if r.value("val_ppl") is not None and r.val_ppl <= limit]
        rule = (
            f"fastest batch-1 decode among variants whose held-out perplexity is within {tolerance:.0%} of "
            f"{reference} ({ref.val_ppl:.4g} -> limit {limit:.4g}); less peak memory breaks ties"
        )
    else:
        qualifying = finished
        rule = (
            f"fastest batch-1 decode ({reference} did not finish, so no perplexity limit); less peak memory breaks ties"
        )
    if not qualifying:
        return None, rule
    best = max(qualifying, key=lambda r: (r.best_decode_tokens_per_s, -(r.value("peak_gib") or 0.0)))
    return best, rule


def _shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it, else absolute."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def fit_command(best: VariantResult, overrides: str = "", data_arguments: list[str] | None = None) -> str:
    """The command that fine-tunes ``best``: its own config, whole (class included), plus the LoRA recipe and the
    study's data."""
    config = resolve_variant(best.config or best.variant)
    parts = ["smarter", "fit", "-c", _shown_path(config), "-c", _shown_path(FINETUNE_RECIPE), *(data_arguments or [])]
    command = shlex.join(parts)
    return f"{command} {overrides}".strip() if overrides else command


__all__ = ["FINETUNE_RECIPE", "choose_best", "fit_command"]
