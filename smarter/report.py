"""The study's report: results.csv, report.md (best value of each column marked), PNG plots, TensorBoard."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

# (key, header, lower_is_better)
COLUMNS: list[tuple[str, str, bool]] = [
    ("load_s", "load s", True),
    ("weights_gib", "weights GiB", True),
    ("peak_gib", "peak GiB", True),
    ("val_ppl", "val ppl", True),
    ("val_bits_per_byte", "bits/byte", True),
    ("kl_vs_reference", "KL vs ref (nats)", True),
    ("top1_agreement", "top-1 agree", False),
    ("prefill_tokens_per_s", "prefill tok/s", False),
    ("ttft_ms", "TTFT ms", True),
    ("decode_tokens_per_s", "decode tok/s", False),
    ("our_generate_tokens_per_s", "generate e2e tok/s", False),
    ("hf_generate_tokens_per_s", "HF generate e2e tok/s", False),
    ("device_time_per_step_ms", "device ms/step", True),
    ("kernels_per_step", "kernels/step", True),
]


def peak_gib(result: dict[str, Any]) -> float | None:
    return result.get("peak_allocated_gib", result.get("peak_host_rss_gib"))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        row = {"variant": result["variant"], "status": result["status"]}
        row.update({key: result.get(key) for key, _, _ in COLUMNS})
        row["peak_gib"] = peak_gib(result)
        if result["status"] != "ok":
            row["status"] = f"failed: {result.get('reason', 'unknown')}"
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = ["variant", "status", *[key for key, _, _ in COLUMNS]]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({field: row.get(field) for field in fields})


def _format(value: Any) -> str:
    if not _finite(value):
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.001 or value == 0 else f"{value:.2e}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    ok_rows = [r for r in rows if r["status"] == "ok"]
    best: dict[str, float] = {}
    for key, _, lower in COLUMNS:
        values = [r[key] for r in ok_rows if _finite(r.get(key))]
        if len(values) > 1:
            best[key] = min(values) if lower else max(values)
    header = "| variant | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 1)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['variant']} | {row['status']} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = []
        for key, _, _ in COLUMNS:
            text = _format(row.get(key))
            cells.append(f"**{text}**" if key in best and row.get(key) == best[key] else text)
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(results: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per figure; only variants that finished are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    names = [r["variant"] for r in ok]
    written: list[Path] = []

    def bar(key: str, title: str, ylabel: str, filename: str, values=None) -> None:
        values = values or [r.get(key) if _finite(r.get(key)) else 0.0 for r in ok]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(names, values, color="#3b6ea5")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=30)
        for index, value in enumerate(values):
            ax.annotate(_format(value), (index, value), ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        path = folder / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    bar("val_ppl", "Held-out perplexity (lower is better)", "perplexity", "perplexity.png")
    bar("decode_tokens_per_s", "Batch-1 greedy decode (higher is better)", "tokens / s", "decode_tokens_per_s.png")
    bar("prefill_tokens_per_s", "Prefill throughput (higher is better)", "tokens / s", "prefill_tokens_per_s.png")
    bar("peak_gib", "Peak memory (lower is better)", "GiB", "peak_memory.png", values=[peak_gib(r) or 0.0 for r in ok])
    bar("device_time_per_step_ms", "Device time per eval step (lower is better)", "ms", "device_time_per_step.png")

    # top kernels, stacked: the five kernels with the most time over all variants, plus "other"
    totals: dict[str, float] = {}
    for r in ok:
        for k in r.get("top_kernels", []):
            totals[k["name"]] = totals.get(k["name"], 0.0) + k["self_device_ms"]
    top = sorted(totals, key=totals.get, reverse=True)[:5]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottoms = [0.0] * len(ok)
    for name in [*top, "other"]:
        heights = []
        for r in ok:
            steps = max(int(r.get("traced_steps") or 1), 1)
            kernels = {k["name"]: k["self_device_ms"] / steps for k in r.get("top_kernels", [])}  # ms per step
            if name == "other":
                per_step = r.get("device_time_per_step_ms") or 0.0
                heights.append(max(per_step - sum(kernels.get(t, 0.0) for t in top), 0.0))
            else:
                heights.append(kernels.get(name, 0.0))
        ax.bar(names, heights, bottom=bottoms, label=name[:60])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_title("Device time per eval step by kernel")
    ax.set_ylabel("ms per step")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = folder / "top_kernels.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    quality_key = "kl_vs_reference" if any(_finite(r.get("kl_vs_reference")) for r in ok) else "val_ppl"
    for r in ok:
        if _finite(r.get("decode_tokens_per_s")) and _finite(r.get(quality_key)):
            ax.scatter(r["decode_tokens_per_s"], r[quality_key], s=40)
            ax.annotate(
                r["variant"],
                (r["decode_tokens_per_s"], r[quality_key]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax.set_xlabel("decode tokens / s (higher is better)")
    ax.set_ylabel(
        "KL vs reference, nats (lower is better)"
        if quality_key == "kl_vs_reference"
        else "val perplexity (lower is better)"
    )
    ax.set_title("Speed versus quality")
    fig.tight_layout()
    path = folder / "speed_vs_quality.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def write_tensorboard(results: list[dict[str, Any]], folder: Path) -> None:
    """Each variant as a TensorBoard run with its figures as scalars and hparams."""
    from torch.utils.tensorboard import SummaryWriter

    for result in results:
        if result["status"] != "ok":
            continue
        metrics = {f"study/{key}": float(result[key]) for key, _, _ in COLUMNS if _finite(result.get(key))}
        if _finite(peak_gib(result)):
            metrics["study/peak_gib"] = float(peak_gib(result))
        model = result.get("model", {})
        hparams = {
            "variant": result["variant"],
            "quantization": model.get("quantization", ""),
            "attention": model.get("attention", ""),
            "dtype": model.get("dtype", ""),
        }
        with SummaryWriter(str(folder / result["variant"])) as writer:
            for key, value in metrics.items():
                writer.add_scalar(key, value, 0)
            writer.add_hparams(hparams, metrics, run_name=".")
