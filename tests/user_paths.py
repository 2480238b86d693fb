"""The runs a user makes, in the order a user makes them: the README's commands as written (read from the
README's text), every fine-tuning recipe as shipped on the tiny preset, and their chains (interrupt and
resume, continue a finished run, export, use each export as a model source). The tests that check them are
in test_user_paths.py; the runs are shared by the session through fixtures in conftest.py.

Run-length overrides only: every recipe keeps its own schedule (two epochs, validation twice an epoch,
its checkpoints and export), here over 4 training batches of 2 blocks an epoch, 2 validation batches, every
step logged.
"""

from __future__ import annotations

from pathlib import Path

from command_runs import Job
from conftest import REPO_ROOT
from readme_commands import readme_command

RECIPES = sorted(path.stem for path in (REPO_ROOT / "configs" / "finetune").glob("*.yaml"))
LOG_EVERY_STEP = "--trainer.log_every_n_steps 1"
RUN_LENGTH = f"--trainer.limit_train_batches 4 --trainer.limit_val_batches 2 --data.batch_size 2 {LOG_EVERY_STEP}"
STUDY_LENGTH = "--new_tokens 6 --repeats 1 --prefill_tokens 64 --kl_tokens 256"
# the recipe whose runs are interrupted, resumed and continued (the one that crashed after mid-epoch validation)
CHAINED = "qlora-fast"

QUICK_START = readme_command("smarter fit -c configs/tiny.yaml").text
TINY_EXPORT = "runs/tiny/version_0/export/model"
SCORE_TINY_EXPORT = readme_command(f"smarter validate -c configs/tiny.yaml --model.source {TINY_EXPORT}").text
PREDICT_TINY_EXPORT = readme_command(
    f"smarter predict -c configs/tiny.yaml --model.source {TINY_EXPORT} "
    "--data.prompts_file configs/prompts/book-openings.txt --data.chat_template false"
).text
STUDY_OF_TINY_EXPORT = readme_command(f'smarter compare --overrides "--model.source {TINY_EXPORT}"').text
FIT_QLORA_ON_CPU = readme_command("smarter fit -c configs/finetune/qlora.yaml --model.source tiny").text
EXPORT_LAST = readme_command("smarter export --ckpt_path runs/qlora/version_0/checkpoints/last.ckpt").text
SCORE_ADAPTER = readme_command(
    "smarter validate -c configs/finetune/qlora.yaml --model.source runs/qlora/version_0/export/adapter"
).text
BOOK_QA = readme_command("python -m datamodules.book_instructions --output data/book-qa.jsonl").text
QA = "configs/tiny-instructions.yaml"
QA_EXPORT = "runs/tiny-instructions/version_0/export/model"
QA_SCORE_BEFORE = readme_command(f"smarter validate -c {QA}").text
QA_PREDICT_BEFORE = readme_command(f"smarter predict -c {QA}").text
QA_FIT = readme_command(f"smarter fit -c {QA}").text
QA_SCORE_AFTER = readme_command(f"smarter validate -c {QA} --model.source {QA_EXPORT}").text
QA_PREDICT_AFTER = readme_command(f"smarter predict -c {QA} --model.source {QA_EXPORT}").text
QLORA_ON_QA = readme_command(
    "smarter fit -c configs/finetune/qlora.yaml -c configs/data/instructions.yaml --data.path data/book-qa.jsonl "
    "--model.source tiny"
).text
STUDY_OF_OWN_TEXT = readme_command(
    "smarter compare --variants '[bf16-sdpa, nf4-sdpa]' --data 'docs/**/*.md' "
    '--overrides "--model.source runs/tiny/version_0/export/model"'
).text
SUBCLASS = readme_command(
    "PYTHONPATH=tests smarter fit -c configs/tiny.yaml --model custom_modules.ZLossMistralModule "
    "--model.z_loss_coef 1e-3"
).text


def recipe_fit(recipe: str) -> str:
    """``smarter fit`` of a shipped recipe on the tiny preset, as the README shows it for qlora.yaml."""
    return FIT_QLORA_ON_CPU.replace("configs/finetune/qlora.yaml", f"configs/finetune/{recipe}.yaml")


def chained(version: str, *extra: str) -> str:
    return " ".join([recipe_fit(CHAINED), RUN_LENGTH, f"--trainer.logger.init_args.version {version}", *extra])


def _one(folder: Path, pattern: str) -> str:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {[p.name for p in found]}"
    return str(found[0].relative_to(folder))


NEW_TOKENS = "--model.generation.max_new_tokens 16"
MERGED = "runs/qlora/version_0/export-last/merged"
ADAPTER_LAST = "runs/qlora/version_0/export-last/adapter"
PROMPTS = "--data.prompts_file configs/prompts/book-openings.txt --model.generation.max_new_tokens 8"


def user_jobs(folder: Path) -> list[Job]:
    """Every run, each after the runs it uses (the longest first among those ready)."""
    stop_after_first_validation = f"runs/{CHAINED}/stopped/checkpoints/best-step*.ckpt"

    def resumed() -> str:
        return chained(
            "resumed", f"--ckpt_path {_one(folder, f'runs/{CHAINED}/stopped/checkpoints/interrupted-*.ckpt')}"
        )

    def export_best() -> str:
        best = _one(folder, "runs/qlora/version_0/checkpoints/best-step*.ckpt")
        return EXPORT_LAST.replace("runs/qlora/version_0/checkpoints/last.ckpt", best)

    from_adapter = FIT_QLORA_ON_CPU.replace("--model.source tiny", "--model.source runs/qlora/version_0/export/adapter")
    return [
        # the quick start, every recipe, and the chained recipe stopped by SIGTERM and by max_steps
        Job("tiny", QUICK_START, folder),
        *(Job(recipe, f"{recipe_fit(recipe)} {RUN_LENGTH}", folder) for recipe in RECIPES),
        Job("stopped", chained("stopped"), folder, stop_when=stop_after_first_validation),
        Job("short", chained("short", "--trainer.max_steps 3"), folder),
        # the README's chain on the tiny run
        Job("study-of-tiny-export", f"{STUDY_OF_TINY_EXPORT} {STUDY_LENGTH}", folder, after=("tiny",)),
        Job("score-tiny-export", SCORE_TINY_EXPORT, folder, after=("tiny",)),
        Job(
            "predict-tiny-export",
            f"{PREDICT_TINY_EXPORT} --model.generation.max_new_tokens 16",
            folder,
            after=("tiny",),
        ),
        Job(
            "subclass",
            f"{SUBCLASS} --trainer.max_steps 3 --trainer.limit_val_batches 2 {LOG_EVERY_STEP}",
            folder,
            after=("tiny",),  # the quick start's run is version_0
        ),
        # the README's worked example on your own data: questions made from the book, the book model fine-tuned
        Job("book-qa", BOOK_QA, folder),
        Job("qa-score-before", QA_SCORE_BEFORE, folder, after=("tiny", "book-qa")),
        Job("qa-predict-before", QA_PREDICT_BEFORE, folder, after=("tiny", "book-qa")),
        Job("qa-fit", QA_FIT, folder, after=("tiny", "book-qa")),
        Job("qa-score-after", QA_SCORE_AFTER, folder, after=("qa-fit", "qa-score-before")),
        Job("qa-predict-after", QA_PREDICT_AFTER, folder, after=("qa-fit", "qa-predict-before")),
        Job(
            "qlora-on-qa",
            f"{QLORA_ON_QA} {RUN_LENGTH} --trainer.logger.init_args.version instructions",
            folder,
            after=("book-qa",),
        ),
        Job(
            "study-of-own-text",
            f"{STUDY_OF_OWN_TEXT} --output_dir study-own-text {STUDY_LENGTH}",
            folder,
            after=("tiny",),
        ),
        # resume and continue
        Job("resumed", resumed, folder, after=("stopped",)),
        Job(
            "continued",
            chained("continued", f"--ckpt_path runs/{CHAINED}/short/checkpoints/last.ckpt"),
            folder,
            after=("short",),
        ),
        # export, and every export as a model source
        Job("export-last", EXPORT_LAST, folder, after=("qlora",)),
        Job("export-best", export_best, folder, after=("qlora",)),
        Job("score-adapter", SCORE_ADAPTER, folder, after=("qlora",)),
        Job(
            "fit-from-adapter",
            f"{from_adapter} {RUN_LENGTH} --trainer.max_steps 2 --trainer.logger.init_args.version from-adapter",
            folder,
            after=("qlora",),
        ),
        Job(
            "study-of-exports",
            f"smarter compare --variants '[bf16-sdpa, nf4-sdpa]' --overrides \"--model.source {MERGED}\" "
            f"--output_dir study-merged {STUDY_LENGTH}",
            folder,
            after=("export-last",),
        ),
        Job(
            "study-of-adapter",
            f"smarter compare --variants '[nf4-sdpa]' --overrides \"--model.source {ADAPTER_LAST}\" "
            f"--output_dir study-adapter {STUDY_LENGTH}",
            folder,
            after=("export-last",),
        ),
        Job(
            "score-merged",
            f"smarter validate -c configs/variants/bf16-sdpa.yaml --model.source {MERGED}",
            folder,
            after=("export-last",),
        ),
        Job(
            "predict-merged",
            f"smarter predict -c configs/variants/bf16-sdpa.yaml --model.source {MERGED} {PROMPTS}",
            folder,
            after=("export-last",),
        ),
        Job(
            "predict-adapter",
            f"smarter predict -c configs/finetune/qlora.yaml --model.source {ADAPTER_LAST} {PROMPTS}",
            folder,
            after=("export-last",),
        ),
    ]
