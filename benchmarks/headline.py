"""BENCHMARKS.md's headline table, made from the benchmark's own JSON so that it cannot go stale.

Each row is one target: a figure of this framework beside its baseline or peer measured in the same run of
``benchmarks/speed_side_by_side.py``, their ratio, and the GPU, date, commit and command of that run. The
runs are the ``summary.json`` files under ``docs/benchmarks/headline/`` (one folder per run); for each row
the newest run that holds both workloads is used.

    python benchmarks/headline.py            # print the table
    python benchmarks/headline.py --write    # put it in BENCHMARKS.md, between its markers
    python benchmarks/headline.py --check    # exit 1 when BENCHMARKS.md's table is not the JSON's
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "docs" / "benchmarks" / "headline"
BENCHMARKS = REPO / "BENCHMARKS.md"
START = "<!-- headline: made by benchmarks/headline.py from docs/benchmarks/headline/*/summary.json; do not edit -->"
END = "<!-- /headline -->"
QLORA_FAST = "fit:configs/finetune/qlora-fast.yaml"
QLORA_LEAN = "fit:configs/finetune/qlora-lean.yaml"
QLORA_OFFLOAD = "fit:configs/finetune/qlora-offload.yaml"
# qlora-offload as measured before it shipped as a preset (nf4 without double quant; the runs at bfdca95)
LONG_CONTEXT = (
    QLORA_OFFLOAD,
    "fit:configs/finetune/qlora-lean.yaml --model.activation_checkpointing offload --model.keep_last_layers 0",
)
# at long rows, positions computed a second: the workloads time different rows, and the book's tail row is
# mostly padding at 16k and 32k tokens (every workload computes it at full length); see comparable_rates in
# speed_side_by_side.py. A run without both figures (unsloth's before 1ce30b4) gives no such row.
POSITIONS = "input_tokens_per_s"
DECODE_NF4 = "decode:configs/variants/nf4-sdpa.yaml --model.kernels off"
DECODE_BF16 = "decode:configs/variants/bf16-sdpa.yaml --model.kernels off"
# FLOPs of a trained 7B token with LoRA (forward, backward through the frozen weights; recomputation not
# counted), and the dense bf16 matrix-product rate measured on these H100/H200s
TRAIN_FLOPS_PER_TOKEN = 4 * 7.2417e9
MATMUL_TFLOPS = 783.0


@dataclass(frozen=True)
class Row:
    """One target: ``workload``'s ``metric`` against ``baseline``'s (``None``: against the FLOP ceiling)."""

    what: str
    workload: str | tuple[str, ...]  # several: the first the run holds (a recipe measured under another name)
    baseline: str | None
    metric: str = "tokens_per_s"
    target: str = ""
    baseline_metric: str | None = None  # the baseline's own figure, when not ``metric``
    shape: tuple[int, int] = (4, 1024)  # (rows, tokens a row) of the run's training steps


ROWS = [
    Row("QLoRA 7B fine-tuning, fastest recipe, vs plain transformers + peft", QLORA_FAST, "plain-qlora:dropout=0"),
    Row("QLoRA 7B fine-tuning, fastest recipe, vs unsloth (no checkpointing)", QLORA_FAST, "unsloth", target="≥ 1.5x"),
    Row("... its peak memory vs unsloth's", QLORA_FAST, "unsloth", "peak_allocated_gib", "≤ 1.2x"),
    Row("... its share of the FLOP ceiling", QLORA_FAST, None, target="≥ 65 %"),
    Row("QLoRA 7B, lean recipe, vs unsloth's offloaded checkpointing", QLORA_LEAN, "unsloth:checkpointing",
        target="≥ 1.3x"),
    Row("... its peak memory vs unsloth's offloaded checkpointing", QLORA_LEAN, "unsloth:checkpointing",
        "peak_allocated_gib", "≤ 1.0x"),
    Row("QLoRA 7B, least-memory recipe (offloaded checkpointing), vs unsloth's", QLORA_OFFLOAD,
        "unsloth:checkpointing", target="≥ 1.3x"),
    Row("... its peak memory vs unsloth's offloaded checkpointing", QLORA_OFFLOAD, "unsloth:checkpointing",
        "peak_allocated_gib", "≤ 1.0x"),
    Row("QLoRA 7B, the default recipe, vs plain transformers + peft", "fit:configs/finetune/qlora.yaml", "plain-qlora"),
    Row("bf16 LoRA 7B, fastest recipe, vs plain transformers + peft", "fit:configs/finetune/lora-bf16-fast.yaml",
        "plain-lora-bf16"),
    Row("QLoRA 7B at 4k-token sequences (batch 1), least-memory recipe, vs unsloth's", LONG_CONTEXT,
        "unsloth:checkpointing", POSITIONS, shape=(1, 4096)),
    Row("QLoRA 7B at 4k-token sequences, least-memory recipe: peak memory vs unsloth's offloaded checkpointing",
        LONG_CONTEXT, "unsloth:checkpointing", "peak_allocated_gib", shape=(1, 4096)),
    Row("QLoRA 7B at 16k-token sequences (batch 1), least-memory recipe, vs unsloth's", LONG_CONTEXT,
        "unsloth:checkpointing", POSITIONS, shape=(1, 16384)),
    Row("QLoRA 7B at 16k-token sequences, least-memory recipe: peak memory vs unsloth's offloaded checkpointing",
        LONG_CONTEXT, "unsloth:checkpointing", "peak_allocated_gib", shape=(1, 16384)),
    Row("QLoRA 7B at 32k-token sequences (batch 1), least-memory recipe, vs unsloth's", LONG_CONTEXT,
        "unsloth:checkpointing", POSITIONS, shape=(1, 32768)),
    Row("QLoRA 7B at 32k-token sequences, least-memory recipe: peak memory vs unsloth's offloaded checkpointing",
        LONG_CONTEXT, "unsloth:checkpointing", "peak_allocated_gib", shape=(1, 32768)),
    Row("Batch-1 greedy decode, nf4 7B (median prompt), vs transformers' generate", DECODE_NF4, DECODE_NF4,
        "generate_tokens_per_s", baseline_metric="hf_generate_tokens_per_s"),
    Row("Batch-1 greedy decode, bf16 7B (median prompt), vs transformers' generate", DECODE_BF16, DECODE_BF16,
        "generate_tokens_per_s", baseline_metric="hf_generate_tokens_per_s"),
]  # fmt: skip


def load_runs(folder: Path = RUNS) -> list[dict]:
    """Every run's summary, newest first (by its recorded date)."""
    runs = []
    for path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        summary["folder"] = str(path.parent.relative_to(REPO)) if path.is_relative_to(REPO) else str(path.parent)
        runs.append(summary)
    return sorted(runs, key=lambda run: run.get("run", {}).get("date", ""), reverse=True)


def shape_of(run: dict) -> tuple[int, int]:
    """(rows, tokens a row) of a run's training steps, from its command's ``--batch`` and ``--block``."""
    words = shlex.split(run.get("run", {}).get("command", ""))
    given = {word: words[i + 1] for i, word in enumerate(words[:-1]) if word in ("--batch", "--block")}
    return int(given.get("--batch", 4)), int(given.get("--block", 1024))


def _figure(result: dict, metric: str) -> float | None:
    """A result's figure; the median of a list of them (one per prompt)."""
    value = result.get(metric)
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        value = statistics.median(value)
    return float(value) if isinstance(value, int | float) and "error" not in result else None


def headline(runs: list[dict]) -> str:
    """The table: one line per row that some run measured, with its source."""
    lines = [
        "| target | ours | against | ratio | aim | GPU | date | commit | run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands: dict[str, str] = {}
    for row in ROWS:
        for run in runs:
            if shape_of(run) != row.shape:
                continue
            results = run.get("results", {})
            names = (row.workload,) if isinstance(row.workload, str) else row.workload
            ours_name = next((name for name in names if name in results), names[0])
            ours = _figure(results.get(ours_name, {}), row.metric)
            theirs = _figure(results.get(row.baseline, {}), row.baseline_metric or row.metric) if row.baseline else None
            if ours is None or (row.baseline and theirs is None):
                continue
            info = run.get("run", {})
            memory = row.metric == "peak_allocated_gib"

            def shown(value: float) -> str:
                return f"{value:,.2f} GiB" if memory else f"{value:,.0f} tok/s"  # noqa: B023

            if row.baseline:
                name = "transformers' generate" if row.baseline_metric else row.baseline
                against, ratio = f"{shown(theirs)} ({name})", f"{ours / theirs:.2f}x"
            else:
                ceiling = MATMUL_TFLOPS * 1e12 / TRAIN_FLOPS_PER_TOKEN
                against = f"{shown(ceiling)} (4 x 7.24 GFLOP a token at {MATMUL_TFLOPS:.0f} TFLOP/s)"
                ratio = f"{ours / ceiling:.0%}"
            gpu = run.get("versions", {}).get("gpu", "?").removeprefix("NVIDIA ")
            folder = run["folder"]
            commands[folder] = info.get("command", "?") + (f" ({info['note']})" if info.get("note") else "")
            cells = [row.what, shown(ours), against, ratio, row.target or "–", gpu, info.get("date", "?")[:10]]
            cells += [info.get("commit", "?")[:7], f"[{Path(folder).name}]({folder})"]
            lines.append("| " + " | ".join(cells) + " |")
            break
    lines.append("")
    for folder, command in commands.items():
        shown, _, note = command.partition(" (")
        lines.append(f"- `{Path(folder).name}`: `{shown}`" + (f" ({note}" if note else ""))
    return "\n".join(lines)


def with_headline(document: str, table: str) -> str:
    """``document`` with the text between the markers replaced by ``table``."""
    if START not in document or END not in document:
        raise SystemExit(f"BENCHMARKS.md lacks the markers {START!r} and {END!r}")
    before, rest = document.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table}\n{END}{after}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="put the table in BENCHMARKS.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md's table is not the JSON's")
    args = parser.parse_args()
    table = headline(load_runs())
    if args.write:
        BENCHMARKS.write_text(with_headline(BENCHMARKS.read_text(), table))
    elif args.check:
        current = BENCHMARKS.read_text()
        if with_headline(current, table) != current:
            print("BENCHMARKS.md's headline is not the one its JSON makes: run python benchmarks/headline.py --write")
            sys.exit(1)
    else:
        print(table)


if __name__ == "__main__":
    main()
