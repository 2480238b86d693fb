"""``smarter compare``: the variant study as one command.

Runs each variant config in its own process (clean memory figures) on the same held-out text and
prompts, collects load time, memory, perplexity, prefill and decode speed, kernel summaries and
quality versus a reference variant (mean KL and top-1 agreement), then writes a report with plots
and names the variant to fine-tune.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.prompts import read_prompts_file
from smarter.errors import ConfigError
from smarter.report import markdown_table, peak_gib, table_rows, write_csv, write_plots, write_tensorboard

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_VARIANTS = [f"variants/{q}-{a}.yaml" for q in ("bf16", "int8", "nf4") for a in ("eager", "sdpa")]


@dataclass
class StudySettings:
    """What the study runs and how it measures.

    Args:
        variants: Variant configs (paths; bare names are looked up in ``configs/variants/``).
        output_dir: Report folder; unset means ``study/<date-time>``.
        overrides: Extra CLI arguments for every variant, e.g. ``"--model.source tiny"``.
        reference: The variant the others are compared with (KL, top-1 agreement, perplexity).
        prompts_file: Prompts for the decode timing (the first one is timed); unset uses the defaults.
        new_tokens: Tokens generated per timed decode.
        repeats: Timed repeats (median reported), after one discarded warm-up.
        prefill_tokens: Prompt length of the prefill timing.
        kl_tokens: Held-out positions compared with the reference.
        hf_baseline: Also time transformers' ``generate`` on each variant.
        ppl_tolerance: A variant qualifies for fine-tuning if its perplexity is within this fraction of
            the reference's; the fastest qualifying decode wins, less peak memory breaking ties.
        timeout_per_variant: Seconds before a variant is stopped and reported failed.
        resume: Reuse variants already measured in ``output_dir``.
    """

    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    output_dir: str | None = None
    overrides: str = ""
    reference: str = "bf16-sdpa"
    prompts_file: str | None = None
    new_tokens: int = 64
    repeats: int = 3
    prefill_tokens: int = 512
    kl_tokens: int = 2048
    hf_baseline: bool = True
    ppl_tolerance: float = 0.05
    timeout_per_variant: int = 1800
    resume: bool = False


def resolve_variant(entry: str) -> Path:
    path = Path(entry).expanduser()
    if path.suffix != ".yaml":
        path = path.with_suffix(".yaml")
    for candidate in (path, REPO_CONFIGS / path, REPO_CONFIGS / "variants" / path.name):
        if candidate.is_file():
            return candidate.resolve()
    return path


def _atomic_json(data: Any, path: Path) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data, indent=2))
    os.replace(partial, path)


def choose_best(results: list[dict[str, Any]], reference: str, tolerance: float) -> tuple[dict | None, str]:
    """The variant to fine-tune and the rule that picked it."""
    ok = [r for r in results if r["status"] == "ok" and math.isfinite(r.get("decode_tokens_per_s") or math.nan)]
    ref = next((r for r in ok if r["variant"] == reference), None)
    if ref is not None:
        limit = ref["val_ppl"] * (1 + tolerance)
        qualifying = [r for r in ok if r["val_ppl"] <= limit]
        rule = (
            f"fastest batch-1 decode among variants whose held-out perplexity is within {tolerance:.0%} of "
            f"{reference} ({ref['val_ppl']:.4g} -> limit {limit:.4g}); less peak memory breaks ties"
        )
    else:
        qualifying = ok
        rule = (
            f"fastest batch-1 decode ({reference} did not finish, so no perplexity limit); less peak memory breaks ties"
        )
    if not qualifying:
        return None, rule
    best = max(qualifying, key=lambda r: (r["decode_tokens_per_s"], -(peak_gib(r) or 0.0)))
    return best, rule


def fit_command(best: dict[str, Any], overrides: str) -> str:
    model = best.get("model", {})
    parts = [
        "smarter fit -c configs/finetune/qlora.yaml",
        f"--model.quantization {model.get('quantization')}",
        f"--model.attention {model.get('attention')}",
        f"--model.dtype {model.get('dtype')}",
    ]
    if overrides:
        parts.append(overrides)
    return " ".join(parts)


def run_variant(name: str, config: Path, settings: StudySettings, out: Path) -> dict[str, Any]:
    """Measure one variant in a fresh process; a crash or timeout becomes a failed result."""
    if not config.is_file():
        return {"variant": name, "status": "failed", "reason": f"config not found: {config}"}
    result_file = out / "variants" / f"{name}.json"
    command = [
        sys.executable,
        "-m",
        "smarter.variant_probe",
        "--config",
        str(config),
        "--out",
        str(result_file),
        "--trace-dir",
        str(out / "kernel_traces" / name),
        "--reference-file",
        str(out / "reference_log_probs.pt"),
        "--prefill-tokens",
        str(settings.prefill_tokens),
        "--new-tokens",
        str(settings.new_tokens),
        "--repeats",
        str(settings.repeats),
        "--kl-tokens",
        str(settings.kl_tokens),
    ]
    if name == settings.reference:
        command.append("--is-reference")
    if settings.hf_baseline:
        command.append("--hf-baseline")
    if settings.prompts_file:
        command += ["--prompts-file", settings.prompts_file]
    command += ["--", *shlex.split(settings.overrides)]
    log_file = out / "logs" / f"{name}.log"
    start = time.perf_counter()
    try:
        with log_file.open("w") as log:
            completed = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, timeout=settings.timeout_per_variant, check=False
            )
        returncode = completed.returncode
    except subprocess.TimeoutExpired:
        return {
            "variant": name,
            "status": "failed",
            "reason": f"timed out after {settings.timeout_per_variant} s (see {log_file})",
        }
    if result_file.is_file():
        result = json.loads(result_file.read_text())
    else:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        result = {"status": "failed", "reason": f"process exited with {returncode}: {' | '.join(tail)}"}
    result["variant"] = name
    result["wall_s"] = time.perf_counter() - start
    return result


def run_study(settings: StudySettings) -> dict[str, Any]:
    """Run every variant, write the report, and return the results with the chosen variant."""
    if settings.prompts_file:
        read_prompts_file(settings.prompts_file)  # refuse an empty or malformed file before any run
    for name, value in (
        ("new_tokens", settings.new_tokens),
        ("repeats", settings.repeats),
        ("prefill_tokens", settings.prefill_tokens),
        ("kl_tokens", settings.kl_tokens),
    ):
        if value < 1:
            raise ConfigError(f"compare --{name} must be >= 1, got {value}.")
    out = Path(settings.output_dir or f"study/{time.strftime('%Y%m%d-%H%M%S')}")
    results_file = out / "results.json"
    previous: dict[str, dict] = {}
    if results_file.is_file():
        if not settings.resume:
            raise ConfigError(
                f"{out} already holds a study; pass --resume true to continue it or choose another "
                "--output_dir (nothing there is overwritten)."
            )
        previous = {r["variant"]: r for r in json.loads(results_file.read_text())["results"]}
    for sub in ("variants", "logs", "kernel_traces", "plots"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    names = [resolve_variant(v).stem for v in settings.variants]
    order = sorted(range(len(names)), key=lambda i: names[i] != settings.reference)  # reference first
    results: list[dict[str, Any]] = []
    for index in order:
        name, config = names[index], resolve_variant(settings.variants[index])
        if previous.get(name, {}).get("status") == "ok":
            results.append(previous[name])
            print(f"[compare] {name}: kept from the earlier run", flush=True)
            continue
        print(f"[compare] {name}: running {config}", flush=True)
        result = run_variant(name, config, settings, out)
        result["config"] = settings.variants[index]  # as the user named it, not a machine-specific path
        status = result["status"] if result["status"] == "ok" else f"FAILED ({result.get('reason')})"
        print(f"[compare] {name}: {status}", flush=True)
        results.append(result)
        _atomic_json({"settings": settings.__dict__, "results": results}, results_file)  # nothing measured is lost

    results.sort(key=lambda r: names.index(r["variant"]))
    best, rule = choose_best(results, settings.reference, settings.ppl_tolerance)
    summary = {
        "settings": settings.__dict__,
        "output_dir": str(out),
        "results": results,
        "chosen": best["variant"] if best else None,
        "rule": rule,
        "fit_command": fit_command(best, settings.overrides) if best else None,
    }
    _atomic_json(summary, results_file)
    rows = table_rows(results)
    write_csv(rows, out / "results.csv")
    plots = write_plots(results, out / "plots")
    write_tensorboard(results, out / "tensorboard")
    write_markdown_report(summary, rows, plots, out)
    return summary


def write_markdown_report(summary: dict[str, Any], rows: list[dict], plots: list[Path], out: Path) -> None:
    ok = [r for r in summary["results"] if r["status"] == "ok"]
    device = ok[0].get("device_name") if ok else "unknown"
    lines = [
        "# Variant study",
        "",
        f"Device: {device}. Generated {time.strftime('%Y-%m-%d %H:%M')} by `smarter compare`.",
        "",
        markdown_table(rows),
        "",
        "Bold marks the best value of each column among finished variants. Timings are medians of "
        f"{summary['settings']['repeats']} runs after a discarded warm-up, GPU synchronized. "
        "KL is the mean KL(reference || variant) of next-token distributions over held-out positions.",
        "",
    ]
    if summary["chosen"]:
        lines += [
            f"**Chosen for fine-tuning: {summary['chosen']}** ({summary['rule']}).",
            "",
            "```bash",
            summary["fit_command"],
            "```",
            "",
        ]
    else:
        lines += [f"No variant qualified ({summary['rule']}).", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def compare_main(args: list[str]) -> None:
    """``smarter compare [--variants ...] [--overrides "..."] ...``"""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="smarter compare", description=__doc__)
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(StudySettings, as_group=False)
    parsed = parser.parse_args(args)
    settings = StudySettings(**{k: v for k, v in vars(parsed).items() if k in StudySettings.__dataclass_fields__})
    summary = run_study(settings)
    print(f"\n[compare] report: {Path(summary['output_dir']) / 'report.md'}")
    if summary["chosen"]:
        print(f"[compare] chosen: {summary['chosen']} ({summary['rule']})")
        print(f"[compare] fine-tune it with:\n  {summary['fit_command']}")
