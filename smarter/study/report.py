"""Every output file of a study, written in one place: results.csv, report.md (best value of each
column in bold), PNG plots and one TensorBoard run per variant. All read ``VariantResult`` records."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

from foundation import atomic_write_text
from smarter.study.records import VariantResult


@dataclass(frozen=True)
class Column:
    """One figure of the report table."""

    key: str  # a VariantResult field (or ``peak_gib``)
    header: str
    lower_is_better: bool


COLUMNS: list[Column] = [
    Column("load_s", "load s", True),
    Column("weights_gib", "weights GiB", True),
    Column("peak_gib", "peak GiB", True),
    Column("val_ppl", "val ppl", True),
    Column("val_bits_per_byte", "bits/byte", True),
    Column("kl_vs_reference", "KL vs ref (nats)", True),
    Column("top1_agreement", "top-1 agree", False),
    Column("prefill_tokens_per_s", "prefill tok/s", False),
    Column("ttft_ms", "TTFT ms", True),
    Column("decode_tokens_per_s", "decode tok/s", False),
    Column("fast_decode_tokens_per_s", "fast decode tok/s", False),
    Column("decode_compile_s", "compile s", True),
    Column("our_generate_tokens_per_s", "generate e2e tok/s", False),
    Column("hf_generate_tokens_per_s", "HF generate e2e tok/s", False),
    Column("device_time_per_step_ms", "device ms/step", True),
    Column("kernels_per_step", "kernels/step", True),
]


def status_text(result: VariantResult) -> str:
    reason = " ".join((result.reason or "unknown").split()).replace("|", "/")  # one table cell
    return "ok" if result.ok else f"failed: {reason}"


def format_value(value: float | None) -> str:
    """A figure for a table cell: thousands separated, three significant digits below 10."""
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.001 or value == 0 else f"{value:.2e}"


def best_values(results: list[VariantResult]) -> dict[str, float]:
    """The best value of each column among finished variants (only where two or more have one)."""
    best: dict[str, float] = {}
    for column in COLUMNS:
        values = [v for r in results if r.ok and (v := r.value(column.key)) is not None]
        if len(values) > 1:
            best[column.key] = min(values) if column.lower_is_better else max(values)
    return best


def markdown_table(results: list[VariantResult]) -> str:
    """One row per variant, the best value of each column in bold; failed variants say why."""
    best = best_values(results)
    lines = [
        "| variant | " + " | ".join(c.header for c in COLUMNS) + " |",
        "|" + " --- |" * (len(COLUMNS) + 1),
    ]
    for result in results:
        if not result.ok:
            lines.append(f"| {result.variant} | {status_text(result)} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = []
        for column in COLUMNS:
            value = result.value(column.key)
            text = format_value(value)
            cells.append(f"**{text}**" if column.key in best and value == best[column.key] else text)
        lines.append(f"| {result.variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(results: list[VariantResult], path: Path) -> None:
    fields = ["variant", "status", *[c.key for c in COLUMNS]]
    rows = [
        {"variant": r.variant, "status": status_text(r), **{c.key: r.value(c.key) for c in COLUMNS}} for r in results
    ]
    staging = path.with_name(path.name + ".partial")
    with staging.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    staging.replace(path)


def write_markdown_report(
    results: list[VariantResult],
    chosen: VariantResult | None,
    rule: str,
    command: str | None,
    repeats: int,
    out: Path,
    data: str | None = None,
) -> Path:
    finished = [r for r in results if r.ok]
    device = finished[0].device_name if finished else "unknown"
    lines = [
        "# Variant study",
        "",
        f"Device: {device}. Generated {time.strftime('%Y-%m-%d %H:%M')} by `smarter compare`. "
        f"Scored on: {data or 'Treasure Island'} (its held-out split).",
        "",
        markdown_table(results),
        "",
        "Bold marks the best value of each column among finished variants. Timings are medians of "
        f"{repeats} runs after a discarded warm-up, GPU synchronized. "
        "KL is the mean KL(reference || variant) of next-token distributions over held-out positions.",
        "",
    ]
    if chosen is not None:
        lines += [f"**Chosen for fine-tuning: {chosen.variant}** ({rule}).", "", "```bash", command or "", "```", ""]
    else:
        lines += [f"No variant qualified ({rule}).", ""]
    lines += ["## Plots", ""] + [f"![{name}](plots/{name}.png)" for name in PLOT_NAMES]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


# ---- plots ---------------------------------------------------------------------------------------

PLOT_NAMES = [
    "perplexity",
    "decode_tokens_per_s",
    "prefill_tokens_per_s",
    "peak_memory",
    "device_time_per_step",
    "top_kernels",
    "speed_vs_quality",
]


def _bar_chart(plt, results: list[VariantResult], key: str, title: str, ylabel: str, path: Path) -> None:
    names = [r.variant for r in results]
    values = [r.value(key) or 0.0 for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, values, color="#3b6ea5")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    for index, value in enumerate(values):
        ax.annotate(format_value(value), (index, value), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kernel_chart(plt, results: list[VariantResult], path: Path) -> None:
    """Device time per step, stacked by the five kernels with the most time over all variants, plus "other"."""
    totals: dict[str, float] = {}
    for r in results:
        for kernel in r.top_kernels:
            totals[kernel.name] = totals.get(kernel.name, 0.0) + kernel.self_device_ms
    top = sorted(totals, key=totals.get, reverse=True)[:5]
    names = [r.variant for r in results]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottoms = [0.0] * len(results)
    for name in [*top, "other"]:
        heights = []
        for r in results:
            steps = max(r.traced_steps or 1, 1)
            per_step = {k.name: k.self_device_ms / steps for k in r.top_kernels}  # ms per step
            if name == "other":
                heights.append(max((r.device_time_per_step_ms or 0.0) - sum(per_step.get(t, 0.0) for t in top), 0.0))
            else:
                heights.append(per_step.get(name, 0.0))
        ax.bar(names, heights, bottom=bottoms, label=name[:60])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_title("Device time per eval step by kernel")
    ax.set_ylabel("ms per step")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed_quality_chart(plt, results: list[VariantResult], path: Path) -> None:
    """Decode speed against quality; each variant a marker of its own, named in the legend.

    Variants that differ only in attention often sit on the same spot, so names are not written
    beside the points (they would overlap); the legend names every marker.
    """
    quality_key = "kl_vs_reference" if any(r.value("kl_vs_reference") is not None for r in results) else "val_ppl"
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, r in enumerate(results):
        speed, quality = r.value("best_decode_tokens_per_s"), r.value(quality_key)
        if speed is None or quality is None:
            continue
        ax.scatter(
            speed, quality, s=70, marker=markers[index % len(markers)], label=r.variant, alpha=0.8, edgecolors="black"
        )
    ax.set_xlabel("decode tokens / s, fastest decoder (higher is better)")
    ax.set_ylabel(
        "KL vs reference, nats (lower is better)"
        if quality_key == "kl_vs_reference"
        else "val perplexity (lower is better)"
    )
    ax.set_title("Speed versus quality")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: list[VariantResult], folder: Path) -> list[Path]:
    """One PNG per figure; only variants that finished are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in results if r.ok]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.png" for name in PLOT_NAMES}
    _bar_chart(plt, finished, "val_ppl", "Held-out perplexity (lower is better)", "perplexity", paths["perplexity"])
    _bar_chart(
        plt,
        finished,
        "best_decode_tokens_per_s",  # what the choosing rule ranks by
        "Batch-1 greedy decode, each variant's fastest decoder (higher is better)",
        "tokens / s",
        paths["decode_tokens_per_s"],
    )
    _bar_chart(
        plt,
        finished,
        "prefill_tokens_per_s",
        "Prefill throughput (higher is better)",
        "tokens / s",
        paths["prefill_tokens_per_s"],
    )
    _bar_chart(plt, finished, "peak_gib", "Peak memory (lower is better)", "GiB", paths["peak_memory"])
    _bar_chart(
        plt,
        finished,
        "device_time_per_step_ms",
        "Device time per eval step (lower is better)",
        "ms",
        paths["device_time_per_step"],
    )
    _kernel_chart(plt, finished, paths["top_kernels"])
    _speed_quality_chart(plt, finished, paths["speed_vs_quality"])
    return list(paths.values())


def write_tensorboard(results: list[VariantResult], folder: Path) -> None:
    """Each finished variant as a TensorBoard run with its figures as scalars and hparams."""
    from torch.utils.tensorboard import SummaryWriter

    for result in results:
        if not result.ok:
            continue
        metrics = {f"study/{c.key}": v for c in COLUMNS if (v := result.value(c.key)) is not None}
        hparams = {
            "variant": result.variant,
            "quantization": str(result.model.get("quantization", "")),
            "attention": str(result.model.get("attention", "")),
            "dtype": str(result.model.get("dtype", "")),
        }
        with SummaryWriter(str(folder / result.variant)) as writer:
            for key, value in metrics.items():
                writer.add_scalar(key, value, 0)
            writer.add_hparams(hparams, metrics, run_name=".")
