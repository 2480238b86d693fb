"""The study's typed result record: what one variant measured, with a JSON round trip.

Every reader (the report table, the chooser, the plots, TensorBoard) reads these fields by name, so
a figure the probe does not measure cannot be read by accident: the record has no such field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "failed"]


@dataclass
class KernelShare:
    """One of a variant's top device kernels over its traced evaluation steps."""

    name: str
    self_device_ms: float
    calls: int
    share: float


@dataclass
class VariantResult:
    """What one variant measured (``None`` where a figure was not measured)."""

    variant: str
    status: Status = "ok"
    reason: str | None = None
    traceback: str | None = None
    config: str | None = None
    wall_s: float | None = None
    # where it ran and what it was
    device: str | None = None
    device_name: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    # loading
    load_s: float | None = None
    weights_gib: float | None = None
    weights_allocated_gib: float | None = None
    # prefill
    prefill_tokens: int | None = None
    prefill_ms: float | None = None
    prefill_tokens_per_s: float | None = None
    # batch-1 greedy decode
    decode_new_tokens: int | None = None
    ttft_ms: float | None = None
    decode_tokens_per_s: float | None = None
    generate_latency_ms: float | None = None
    our_generate_tokens_per_s: float | None = None
    hf_generate_latency_ms: float | None = None
    hf_generate_tokens_per_s: float | None = None
    # the same decode with the framework's fast decoder (static cache; CUDA graphs on a GPU)
    fast_decoder: str | None = None
    fast_ttft_ms: float | None = None
    fast_decode_tokens_per_s: float | None = None
    fast_generate_tokens_per_s: float | None = None
    decode_compile_s: float | None = None
    # quality versus the reference variant
    kl_tokens: int | None = None
    kl_vs_reference: float | None = None
    top1_agreement: float | None = None
    # held-out quality, evaluation throughput and kernels
    val_ppl: float | None = None
    val_bits_per_byte: float | None = None
    val_loss: float | None = None
    eval_tokens_per_s: float | None = None
    device_time_per_step_ms: float | None = None
    kernels_per_step: float | None = None
    traced_steps: int | None = None
    eval_batch_shape: list[int] | None = None
    top_kernels: list[KernelShare] = field(default_factory=list)
    # memory
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_host_rss_gib: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def best_decode_tokens_per_s(self) -> float | None:
        """The faster of the eager and the fast decoder: the variant at its best."""
        speeds = [v for v in (self.value("decode_tokens_per_s"), self.value("fast_decode_tokens_per_s")) if v]
        return max(speeds, default=None)

    @property
    def peak_gib(self) -> float | None:
        """Peak memory: GPU allocations on a GPU, resident host memory on a CPU."""
        return self.peak_allocated_gib if self.peak_allocated_gib is not None else self.peak_host_rss_gib

    def value(self, key: str) -> float | None:
        """A numeric figure by field name (``peak_gib`` included), or None when absent or not finite."""
        value = getattr(self, key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantResult:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["top_kernels"] = [KernelShare(**kernel) for kernel in values.get("top_kernels") or []]
        return cls(**values)

    @classmethod
    def failed(cls, variant: str, reason: str, **details: Any) -> VariantResult:
        """A variant that could not be measured, with its reason on one line (a report's table cell)."""
        return cls(variant=variant, status="failed", reason=" ".join(reason.split()), **details)
