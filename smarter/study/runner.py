"""Running a study: every variant in its own process, results saved after each, then the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from datamodules.prompts import read_prompts_file
from foundation import ConfigError, atomic_write_json, held_lock, notify
from smarter.study.chooser import choose_best, fit_command
from smarter.study.probe import StudyPaths
from smarter.study.records import VariantResult
from smarter.study.report import write_csv, write_markdown_report, write_plots, write_tensorboard
from smarter.study.settings import StudySettings, configured_source, resolve_variant, variant_name


@dataclass
class StudySummary:
    """What ``run_study`` returns: every result, the chosen variant, the rule, and its fit command."""

    output_dir: Path
    results: list[VariantResult]
    chosen: VariantResult | None
    rule: str
    fit_command: str | None


def _terminate(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a variant's process and everything it started (it runs in a process group of its own)."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_variant(entry: str, settings: StudySettings, paths: StudyPaths) -> VariantResult:
    """Measure one variant in a fresh process; a crash or timeout becomes a failed result.

    The process runs in its own process group and is taken down with the study: an interrupted
    study (Ctrl-C, SIGTERM) never leaves a probe running behind it.
    """
    name = variant_name(entry)
    config = resolve_variant(entry)
    if not config.is_file():
        return VariantResult.failed(name, f"config not found: {config}", config=entry)
    try:
        with held_lock(paths.lock(name), f"variant {name}"):
            pass  # free: no probe of this variant is still running from an interrupted study
    except ConfigError as busy:
        return VariantResult.failed(name, f"{busy} (a probe from an earlier, interrupted run)", config=entry)
    result_file = paths.result(name)
    result_file.unlink(missing_ok=True)  # a result left by an earlier, interrupted probe is not this one's
    command = [sys.executable, "-m", "smarter.study.probe", "--settings", str(paths.settings), "--variant", entry]
    log_file = paths.log(name)
    start = time.perf_counter()
    with log_file.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=settings.timeout_per_variant)
        except subprocess.TimeoutExpired:
            _terminate(process)
            return VariantResult.failed(
                name, f"timed out after {settings.timeout_per_variant} s (see {log_file})", config=entry
            )
        except BaseException:  # KeyboardInterrupt, SystemExit from a signal handler
            _terminate(process)
            raise
    if result_file.is_file():
        result = VariantResult.from_dict(json.loads(result_file.read_text()))
    else:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        result = VariantResult.failed(name, f"process exited with {returncode}: {' | '.join(tail)}")
    result.variant = name
    result.config = entry  # as the user named it, not a machine-specific path
    result.wall_s = time.perf_counter() - start
    return result


def _previous_results(paths: StudyPaths, settings: StudySettings) -> dict[str, VariantResult]:
    results_file = paths.root / "results.json"
    if not results_file.is_file():
        return {}
    if not settings.resume:
        raise ConfigError(
            f"{paths.root} already holds a study; pass --resume true to continue it or choose another "
            "--output_dir (nothing there is overwritten)."
        )
    saved = json.loads(results_file.read_text())
    return {r["variant"]: VariantResult.from_dict(r) for r in saved["results"]}


def _save(paths: StudyPaths, settings: StudySettings, results: list[VariantResult], **extra) -> None:
    summary = {"settings": settings.to_dict(), "results": [r.to_dict() for r in results], **extra}
    atomic_write_json(paths.root / "results.json", summary)


def warn_of_a_large_study_on_a_cpu(settings: StudySettings) -> None:
    """Say so before a study of 7B-shape variants starts on a machine without a GPU (hours, tens of GB)."""
    import torch

    if torch.cuda.is_available():
        return
    large = [entry for entry in settings.variants if configured_source(entry, settings.overrides) not in (None, "tiny")]
    if large:
        notify(
            f"no GPU here, and {len(large)} variant(s) ({', '.join(variant_name(e) for e in large[:3])}...) load a "
            "7B-shape or real model: on a CPU each takes tens of minutes and tens of GB of memory. For a CPU demo, "
            'add --overrides "--model.source tiny" (or a folder that `smarter fit -c configs/tiny.yaml` exported). '
            "Each variant's progress is in <output_dir>/logs/."
        )


def run_study(settings: StudySettings) -> StudySummary:
    """Run every variant, write the report, and return the results with the chosen variant."""
    settings.check()
    warn_of_a_large_study_on_a_cpu(settings)
    if settings.prompts_file:
        read_prompts_file(settings.prompts_file)  # refuse an empty or malformed file before any run
    settings.output_dir = settings.output_dir or f"study/{time.strftime('%Y%m%d-%H%M%S')}"
    paths = StudyPaths(Path(settings.output_dir))
    previous = _previous_results(paths, settings)
    with held_lock(paths.study_lock, f"the study folder {paths.root}"):
        return _run_locked(settings, paths, previous)


def _run_locked(settings: StudySettings, paths: StudyPaths, previous: dict[str, VariantResult]) -> StudySummary:
    for sub in ("variants", "logs", "kernel_traces", "plots"):
        (paths.root / sub).mkdir(parents=True, exist_ok=True)
    settings.save(paths.settings)

    names = [variant_name(entry) for entry in settings.variants]
    order = sorted(range(len(names)), key=lambda i: names[i] != settings.reference)  # reference first
    results: list[VariantResult] = []
    for index in order:
        name, entry = names[index], settings.variants[index]
        if name in previous and previous[name].ok:
            results.append(previous[name])
            print(f"[compare] {name}: kept from the earlier run", flush=True)
            continue
        print(f"[compare] {name}: running {resolve_variant(entry)} (progress: {paths.log(name)})", flush=True)
        result = run_variant(entry, settings, paths)
        print(f"[compare] {name}: {'ok' if result.ok else f'FAILED ({result.reason})'}", flush=True)
        results.append(result)
        _save(paths, settings, results)  # nothing measured is lost

    results.sort(key=lambda r: names.index(r.variant))
    chosen, rule = choose_best(results, settings.reference, settings.ppl_tolerance)
    command = fit_command(chosen, settings.overrides, settings.data_arguments()) if chosen else None
    _save(paths, settings, results, chosen=chosen.variant if chosen else None, rule=rule, fit_command=command)
    write_csv(results, paths.root / "results.csv")
    write_plots(results, paths.root / "plots")
    write_tensorboard(results, paths.root / "tensorboard")
    write_markdown_report(results, chosen, rule, command, settings.repeats, paths.root, settings.data)
    return StudySummary(output_dir=paths.root, results=results, chosen=chosen, rule=rule, fit_command=command)
