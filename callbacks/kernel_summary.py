"""Turning torch.profiler events into a kernel summary: per kernel, per aten operator, per step.

Operators are dispatcher ops (``aten::mm``, ``bitsandbytes::gemv_4bit``...). On a GPU, "kernels" are
the device kernels (and memcpy/memset) each operator launched, and device time is their duration. On a
CPU-only run the CPU is the device: each operator's self CPU time is the work it did itself, so the
kernel table is the operators by self CPU time. Every figure
is a self time, so nothing is counted twice.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass

US_PER_MS = 1000.0


@dataclass
class _Row:
    calls: int = 0
    self_device_us: float = 0.0
    self_cpu_us: float = 0.0


@dataclass
class _Step:
    name: str
    start_us: float
    end_us: float
    device_us: float = 0.0
    kernels: int = 0


def _self_device_us(event) -> float:
    value = getattr(event, "self_device_time_total", None)
    if value is None:  # older torch
        value = getattr(event, "self_cuda_time_total", 0.0)
    return float(value or 0.0)


def _is_operator(event) -> bool:
    """A dispatcher operator (``aten::mm``, ``bitsandbytes::gemv_4bit``...), not a user range."""
    name = event.name
    return "::" in name and not name.startswith(("ProfilerStep", "[")) and " " not in name


def _is_step_marker(event) -> bool:
    return event.name.startswith("ProfilerStep")


def summarize_profile(events, on_gpu: bool, top_k: int = 25, drop_last_step: bool = False) -> dict:
    """Summarize one active profiler cycle.

    Args:
        events: ``profiler.events()`` of the cycle (``FunctionEvent`` list).
        on_gpu: Whether a CUDA activity was recorded (decides what a kernel is).
        top_k: Rows kept in each table (totals always cover every row).
        drop_last_step: Leave out the last step and everything from its start on (a step that the
            profiler's ``stop()`` closed, after the stage's last batch, holds no batch).

    Returns:
        A JSON-friendly dict with ``kernels``, ``operators``, ``steps`` and ``totals``.
    """
    cpu_events = [e for e in events if getattr(e.device_type, "name", str(e.device_type)) == "CPU"]
    steps = sorted(
        (_Step(e.name, e.time_range.start, e.time_range.end) for e in cpu_events if _is_step_marker(e)),
        key=lambda s: s.start_us,
    )
    if drop_last_step and steps:
        cutoff = steps.pop().start_us
        cpu_events = [e for e in cpu_events if e.time_range.start < cutoff]
    starts = [s.start_us for s in steps]

    def step_of(event) -> _Step | None:
        index = bisect.bisect_right(starts, event.time_range.start) - 1
        if index >= 0 and event.time_range.start <= steps[index].end_us:
            return steps[index]
        return None

    operators: dict[str, _Row] = defaultdict(_Row)
    kernels: dict[str, _Row] = defaultdict(_Row)
    op_events = [e for e in cpu_events if _is_operator(e)]
    for event in op_events:
        row = operators[event.name]
        row.calls += 1
        row.self_cpu_us += float(event.self_cpu_time_total)
        row.self_device_us += _self_device_us(event) if on_gpu else float(event.self_cpu_time_total)
    for event in cpu_events:
        step = step_of(event)
        if on_gpu:
            for kernel in getattr(event, "kernels", []) or []:
                row = kernels[kernel.name]
                row.calls += 1
                row.self_device_us += float(kernel.duration)
                if step is not None:
                    step.device_us += float(kernel.duration)
                    step.kernels += 1
        elif _is_operator(event):
            row = kernels[event.name]
            row.calls += 1
            row.self_device_us += float(event.self_cpu_time_total)
            row.self_cpu_us += float(event.self_cpu_time_total)
            if step is not None:
                step.device_us += float(event.self_cpu_time_total)
                step.kernels += 1

    total_device_us = sum(row.self_device_us for row in kernels.values())

    def table(rows: dict[str, _Row]) -> list[dict]:
        ordered = sorted(rows.items(), key=lambda item: item[1].self_device_us, reverse=True)
        return [
            {
                "name": name,
                "calls": row.calls,
                "self_device_ms": row.self_device_us / US_PER_MS,
                "mean_device_ms": row.self_device_us / US_PER_MS / max(row.calls, 1),
                "self_cpu_ms": row.self_cpu_us / US_PER_MS,
                "share_of_device_time": row.self_device_us / total_device_us if total_device_us else 0.0,
            }
            for name, row in ordered[:top_k]
        ]

    step_rows = [
        {
            "step": index,
            "cpu_time_ms": (step.end_us - step.start_us) / US_PER_MS,
            "device_time_ms": step.device_us / US_PER_MS,
            "kernel_count": step.kernels,
        }
        for index, step in enumerate(steps)
    ]
    return {
        "device_kind": "cuda" if on_gpu else "cpu",
        "kernel_meaning": ("device kernels" if on_gpu else "operators by self CPU time (CPU is the device)"),
        "kernels": table(kernels),
        "operators": table(operators),
        "steps": step_rows,
        "totals": {
            "device_time_ms": total_device_us / US_PER_MS,
            "device_time_in_steps_ms": sum(s.device_us for s in steps) / US_PER_MS,
            "operator_self_device_ms": sum(r.self_device_us for r in operators.values()) / US_PER_MS,
            "kernel_calls": sum(r.calls for r in kernels.values()),
            "distinct_kernels": len(kernels),
            "distinct_operators": len(operators),
            "steps": len(steps),
            "mean_device_time_per_step_ms": (
                sum(s.device_us for s in steps) / US_PER_MS / len(steps) if steps else 0.0
            ),
        },
    }


def format_top_table(summary: dict, rows: int = 15) -> str:
    """A plain-text table of the top kernels and operators."""
    lines = []
    for title, key in (("Top kernels", "kernels"), ("Top operators (self device time)", "operators")):
        lines.append(f"{title} ({summary['device_kind']}):")
        lines.append(f"{'self ms':>10} {'share':>7} {'calls':>7} {'mean ms':>9}  name")
        for row in summary[key][:rows]:
            lines.append(
                f"{row['self_device_ms']:10.3f} {row['share_of_device_time']:7.1%} {row['calls']:7d} "
                f"{row['mean_device_ms']:9.4f}  {row['name'][:110]}"
            )
        lines.append("")
    totals = summary["totals"]
    lines.append(
        f"device time {totals['device_time_ms']:.3f} ms over {totals['steps']} steps "
        f"({totals['mean_device_time_per_step_ms']:.3f} ms/step, {totals['kernel_calls']} kernel calls)"
    )
    return "\n".join(lines)
