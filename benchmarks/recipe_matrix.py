"""The GPU recipe matrix: every config of ``configs/finetune/`` and ``configs/variants/``, and the README's GPU
commands, run through the installed ``smarter`` as shipped, at the Mistral-7B shape, through the stages each
is meant for. Writes a JSON of every step (after each one, so an interrupted matrix keeps what it ran and
``--resume`` continues it) and a markdown table (``docs/benchmarks/recipe-matrix.md``).

- a fine-tuning recipe: fit over two epochs with its own validation schedule and checkpoints; the same fit
  stopped by SIGTERM after its first validation, and resumed; ``smarter export`` of its last checkpoint;
  validate with the exported adapter as the source; predict on it with the compiled static decoder;
- a variant: validate (with the throughput callback) and predict with the compiled static decoder;
- the study on two variants; the README's commands that need a GPU.

The functional pass uses a 4-layer Mistral-7B shape (``--layers``): each layer's kernels and shapes are the
full model's; a recipe that keeps its last layers' activations gets two layers more than it keeps. Steps run
``--parallel`` at a time on the one GPU: their tokens/s then share it, so read them as
"it runs", not as speed figures (BENCHMARKS.md has those); peak memory is each process's own.

    python benchmarks/recipe_matrix.py --out matrix.json --report docs/benchmarks/recipe-matrix.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from command_runs import Job, make_user_folder, run_job  # noqa: E402
from readme_commands import readme_commands  # noqa: E402

TRAIN_LENGTH = "--trainer.limit_train_batches 6 --trainer.limit_val_batches 4 --trainer.log_every_n_steps 1"
THROUGHPUT = "-c configs/callbacks/throughput.yaml"
PROMPTS = "--data.prompts_file configs/prompts/book-openings.txt --data.chat_template false"
DECODE = f"--model.generation.decoder static-compiled --model.generation.max_new_tokens 32 {PROMPTS}"
INSTRUCTIONS = "-c configs/data/instructions.yaml --data.path data/book-qa.jsonl"
STUDY = "--new_tokens 16 --repeats 1 --prefill_tokens 256 --kl_tokens 512"


@dataclass(frozen=True)
class Step:
    """One command of the matrix.

    Args:
        name: ``<config>: <stage>``.
        config: The config it exercises (``finetune/qlora-fast``), or ``README``.
        stage: ``fit``, ``stop``, ``resume``, ``export``, ``validate``, ``predict``, ``compare`` or ``readme``.
        command: The command line, run in the matrix's folder (``{interrupted}`` is the stopped run's checkpoint).
        run: The run folder it writes (for its logged figures), relative to the matrix's folder.
        stop_when: A glob whose first match sends it SIGTERM.
        expect: The exit status it should end with.
    """

    name: str
    config: str
    stage: str
    command: str
    run: str = ""
    stop_when: str | None = None
    expect: int = 0


def shape(layers: int) -> str:
    return f"--model.preset_overrides '{{num_hidden_layers: {layers}}}'" if layers else ""


def model_settings(config: Path) -> dict:
    """The ``model`` section of a config file, its ``extends`` followed (later files win)."""
    import yaml

    from smarter.config_files import expand_config_file

    model: dict = {}
    for value in expand_config_file(config)[1::2]:  # ["-c", a file or YAML text, ...]
        text = Path(value).read_text() if value.endswith(".yaml") else value
        model |= (yaml.safe_load(text) or {}).get("model") or {}
    return model


def recipe_layers(recipe: str, layers: int) -> int:
    """The matrix's shape for a recipe: ``layers``, or two more than the recipe keeps unrecomputed
    (qlora-lean keeps its last 4), so that its checkpointing runs."""
    kept = model_settings(REPO / "configs" / "finetune" / f"{recipe}.yaml").get("keep_last_layers", 0)
    return max(layers, kept + 2) if layers else layers


def recipe_steps(recipe: str, layers: int, data: str = "", on: str = "") -> list[Step]:
    """A recipe's chain; with ``data`` (config arguments), on that data, its runs named after ``on``."""
    config = f"finetune/{recipe}" + (f" on {on}" if on else "")
    layers = recipe_layers(recipe, layers)
    fit = f"smarter fit -c configs/finetune/{recipe}.yaml {THROUGHPUT} {data} {shape(layers)}".replace("  ", " ")
    runs = f"runs/{recipe}"
    version = f"matrix-{on}" if on else "matrix"
    adapter = f"{runs}/{version}/export/adapter"
    decode = DECODE.replace(PROMPTS, "") if data else DECODE  # held-out prompts of the data, or the book's
    named = f" --trainer.logger.init_args.version {version}" if on else ""  # beside the book's version_0
    scored = f"{runs}/validate/{version}" if on else f"{runs}/validate/version_0"
    return [
        Step(
            f"{config}: fit",
            config,
            "fit",
            f"{fit} {TRAIN_LENGTH} --trainer.logger.init_args.version {version}",
            f"{runs}/{version}",
        ),
        Step(
            f"{config}: SIGTERM",
            config,
            "stop",
            f"{fit} {TRAIN_LENGTH} --trainer.logger.init_args.version {version}-stopped",
            f"{runs}/{version}-stopped",
            stop_when=f"{runs}/{version}-stopped/checkpoints/best-step*.ckpt",
            expect=143,
        ),
        Step(
            f"{config}: resume",
            config,
            "resume",
            f"{fit} {TRAIN_LENGTH} --trainer.logger.init_args.version {version}-resumed --ckpt_path {{interrupted}}",
            f"{runs}/{version}-resumed",
        ),
        Step(
            f"{config}: export", config, "export", f"smarter export --ckpt_path {runs}/{version}/checkpoints/last.ckpt"
        ),
        Step(
            f"{config}: validate",
            config,
            "validate",
            f"smarter validate -c configs/finetune/{recipe}.yaml {THROUGHPUT} {data} --model.source {adapter} "
            f"--trainer.limit_val_batches 4{named}".replace("  ", " "),
            scored,
        ),
        Step(
            f"{config}: predict",
            config,
            "predict",
            " ".join(f"smarter predict -c configs/finetune/{recipe}.yaml {THROUGHPUT} {data} {decode}".split())
            + f" --model.source {adapter}{named}",
            f"{runs}/predict/{version}" if on else f"{runs}/predict/version_0",
        ),
    ]


def variant_steps(variant: str, layers: int) -> list[Step]:
    config, runs = f"variants/{variant}", f"runs/{variant}"
    base = f"-c configs/variants/{variant}.yaml {THROUGHPUT} {shape(layers)}"
    return [
        Step(
            f"{config}: validate",
            config,
            "validate",
            f"smarter validate {base} --trainer.limit_val_batches 8",
            f"{runs}/validate/version_0",
        ),
        Step(f"{config}: predict", config, "predict", f"smarter predict {base} {DECODE}", f"{runs}/predict/version_0"),
    ]


def readme_steps(layers: int) -> list[Step]:
    """The README's GPU commands, as written, at the matrix's shape and length."""
    steps = []
    for command in readme_commands():
        if command.kind != "gpu":
            continue
        if command.argv[0] == "compare":
            extra = f'--overrides "{shape(layers)}" --output_dir study-readme-{len(steps)} {STUDY}'
        else:
            extra = f"{shape(layers)} --trainer.limit_val_batches 8"
        steps.append(Step(f"README: {command.text}", "README", "readme", f"{command.text} {extra}"))
    return steps


def plan_steps(layers: int = 4) -> list[Step]:
    """Every step of the matrix, in order (steps of one config run in this order, one after another)."""
    recipes = sorted(path.stem for path in (REPO / "configs" / "finetune").glob("*.yaml"))
    variants = sorted(path.stem for path in (REPO / "configs" / "variants").glob("*.yaml"))
    steps = [step for recipe in recipes for step in recipe_steps(recipe, layers)]
    # your own data: the fastest recipe's whole chain on the instruction set the README makes from the book
    steps += recipe_steps("qlora-fast", layers, INSTRUCTIONS, on="instructions")
    steps += [step for variant in variants for step in variant_steps(variant, layers)]
    steps.append(
        Step(
            "study: bf16-sdpa, nf4-sdpa",
            "study",
            "compare",
            f"smarter compare --variants '[bf16-sdpa, nf4-sdpa]' --overrides \"{shape(layers)}\" "
            f"--output_dir study-matrix {STUDY}",
        ),
    )
    return steps + readme_steps(layers)


def _figures(folder: Path, step: Step) -> dict[str, float]:
    """tokens/s and peak memory the step's run logged (the throughput callback), or decoded (predict)."""
    figures: dict[str, float] = {}
    run = folder / step.run if step.run else None
    if run is None or not run.exists():
        return figures
    events = list(run.glob("events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(run))
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        stage = {"validate": "val", "predict": "predict"}.get(step.stage, "train")
        for key, tag in (("tokens_per_s", f"perf/{stage}/tokens_per_s"),
                         ("peak_gib", f"perf/{stage}/peak_allocated_gib"),
                         ("val_ppl", "val/ppl")):  # fmt: skip
            if tag in tags:
                figures[key] = accumulator.Scalars(tag)[-1].value
    predictions = run / "predictions.jsonl"
    if predictions.is_file():
        records = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
        if records:
            figures["decode_tokens_per_s"] = sorted(r["decode_tokens_per_s"] for r in records)[len(records) // 2]
    return figures


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("smarter: error:"):
            return line
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors[-1] if errors else (lines[-1] if lines else ""))[:400]


def run_step(step: Step, folder: Path, logs: Path) -> dict:
    command = step.command
    if "{interrupted}" in command:
        stopped = step.run.replace("-resumed", "-stopped")  # the SIGTERM step's run
        found = sorted(folder.glob(f"{stopped}/checkpoints/interrupted-step*.ckpt"))
        if not found:
            return {**asdict(step), "status": "skipped", "error": "the SIGTERM step left no interrupted checkpoint"}
        command = command.replace("{interrupted}", str(found[-1].relative_to(folder)))
    ran = run_job(Job(step.name, command, folder, stop_when=step.stop_when, timeout=1200))
    log = logs / (step.name.replace("/", "-").replace(": ", "-").replace(" ", "_")[:80] + ".log")
    log.write_text(f"$ {command}\n\n{ran.stdout}\n--- stderr ---\n{ran.stderr}")
    ok = ran.returncode == step.expect and "Traceback" not in ran.stderr
    return {
        **asdict(step),
        "command": command,
        "status": "pass" if ok else "fail",
        "returncode": ran.returncode,
        "seconds": round(ran.seconds, 1),
        "error": "" if ok else _first_error(ran.stderr),
        **_figures(folder, step),
    }


def environment() -> dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("lightning", "transformers", "peft", "bitsandbytes", "liger_kernel"):
        try:
            info[package] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            info[package] = "not installed"
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    try:  # $SMARTER_COMMIT names the commit where the checkout's own HEAD is not the tree that ran
        info["commit"] = (
            os.environ.get("SMARTER_COMMIT")
            or subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return str(value).replace("|", "/") if value not in (None, "") else "–"


def write_report(results: list[dict], info: dict[str, str], path: Path, layers: int, parallel: int) -> None:
    passed = sum(r["status"] == "pass" for r in results)
    lines = [
        "# GPU recipe matrix",
        "",
        "Every shipped fine-tuning recipe and variant, and the README's GPU commands, run through `smarter` as",
        f"shipped at the Mistral-7B shape with {layers} layers (`benchmarks/recipe_matrix.py`). {passed} of "
        f"{len(results)} steps passed.",
        "",
        f"GPU: {info.get('gpu')}; commit {info.get('commit')}; {info.get('date')}; torch {info.get('torch')}, "
        f"lightning {info.get('lightning')}, transformers {info.get('transformers')}, peft {info.get('peft')}, "
        f"bitsandbytes {info.get('bitsandbytes')}, liger-kernel {info.get('liger_kernel')}.",
        "",
        f'Steps ran {parallel} at a time on the one GPU, so tokens/s are shared figures ("it runs"), not speed '
        "results: BENCHMARKS.md has those. Peak memory is each process's own.",
        "",
        "`vs fit`: how far a resumed run's last validation, or the exported adapter's validation, is from the",
        "uninterrupted fit's (relative).",
        "",
        "| step | status | exit | s | tokens/s | peak GiB | val ppl | vs fit | decode tok/s | first error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fitted = {r["config"]: r.get("val_ppl") for r in results if r["stage"] == "fit"}
    for r in results:
        reference = fitted.get(r["config"]) if r["stage"] in ("resume", "validate") else None
        versus = f"{(r['val_ppl'] - reference) / reference:+.1e}" if reference and r.get("val_ppl") else "–"
        lines.append(
            f"| {r['name']} | {r['status']} | {r.get('returncode', '–')} | {_cell(r.get('seconds'))} | "
            f"{_cell(r.get('tokens_per_s'))} | {_cell(r.get('peak_gib'))} | {_cell(r.get('val_ppl'))} | {versus} | "
            f"{_cell(r.get('decode_tokens_per_s'))} | {_cell(r.get('error'))} |"
        )
    lines += ["", "The commands, as run:", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="recipe-matrix.json", help="the JSON of every step, written after each")
    parser.add_argument("--report", default=None, help="the markdown table to write (docs/benchmarks/recipe-matrix.md)")
    parser.add_argument("--folder", default="matrix-runs", help="where the runs are written")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B shape (0: all 32)")
    parser.add_argument("--parallel", type=int, default=1, help="configs run at once (each config's steps in order)")
    parser.add_argument("--only", nargs="*", default=None, help="run only steps whose name contains one of these")
    parser.add_argument("--resume", action="store_true", help="keep the passed steps of --out and run the rest")
    args = parser.parse_args(argv)

    import threading

    folder = make_user_folder(Path(args.folder).resolve())
    questions = folder / "data" / "book-qa.jsonl"  # the instruction set the README's GPU command fine-tunes on
    if not questions.is_file():
        from datamodules.book_instructions import main as make_book_questions

        make_book_questions(["--output", str(questions)])
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    out = Path(args.out)
    kept = {}
    if args.resume and out.is_file():
        kept = {r["name"]: r for r in json.loads(out.read_text())["steps"] if r["status"] == "pass"}
    steps = [s for s in plan_steps(args.layers) if not args.only or any(o in s.name for o in args.only)]
    info = environment()
    results: dict[str, dict] = dict(kept)
    lock = threading.Lock()
    groups: dict[str, list[Step]] = {}
    for step in steps:
        groups.setdefault(step.config if step.config != "README" else step.name, []).append(step)
    # the longest groups first (the six-variant study, then the recipes' chains), so no lane ends long after the rest
    queue = sorted(groups.values(), key=lambda group: (group[0].stage not in ("readme", "compare"), -len(group)))

    def save() -> None:
        ordered = [results[s.name] for s in steps if s.name in results]
        out.write_text(json.dumps({"environment": info, "steps": ordered}, indent=2) + "\n")
        if args.report:
            write_report(ordered, info, Path(args.report), args.layers, args.parallel)

    def lane() -> None:
        while True:
            with lock:
                if not queue:
                    return
                group = queue.pop(0)
            for step in group:
                if step.name in kept:
                    continue
                result = run_step(step, folder, logs)
                with lock:
                    results[step.name] = result
                    save()
                print(
                    f"[matrix] {step.name}: {result['status']} ({result.get('seconds')} s) {result.get('error', '')}",
                    flush=True,
                )

    lanes = [threading.Thread(target=lane) for _ in range(max(1, args.parallel))]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    save()
    failed = [name for name, r in results.items() if r["status"] != "pass"]
    print(f"[matrix] {len(results) - len(failed)} of {len(results)} passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
