"""What users run is what is tested: the installed ``smarter`` command, in subprocesses, with the shipped configs
and the README's own commands, chained as a user chains them (tests/user_paths.py lists the runs).

- every recipe of ``configs/finetune/`` fits over two epochs with its own validations, checkpoints and export;
- SIGTERM then ``--ckpt_path`` continues the uninterrupted run's losses; so does continuing a run that
  ``max_steps`` ended inside an epoch;
- ``smarter export`` on ``last.ckpt`` and on the best checkpoint; every export folder is a model source for
  validate, predict and compare;
- the adapter on its base through plain peft, and ``merged/`` through transformers alone, score (with this
  test's own perplexity loop) what ``smarter validate`` scores;
- the exported tokenizer is the training tokenizer, so the exported model scores the run's perplexity;
- every README command that runs on a CPU was run here; the others are the GPU recipe matrix's.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from command_runs import EXECUTED
from conftest import BOOK, REPO_ROOT
from helpers import scalars
from readme_commands import readme_commands
from user_paths import CHAINED, MERGED, RECIPES

pytestmark = pytest.mark.slow
EPOCH_BATCHES, EPOCHS = 4, 2  # RUN_LENGTH's 4 training batches an epoch; the recipes' own 2 epochs


def _values(run, tag: str) -> dict[int, float]:
    return dict(scalars(run)[tag])


def _last(run, tag: str) -> float:
    return scalars(run)[tag][-1][1]


def _checkpoint(path):
    from lightning_modules.checkpoints import read_checkpoint

    return read_checkpoint(path)


def _adapter_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ---- every recipe as shipped ----------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_fits_two_epochs_with_its_own_validations_checkpoints_and_export(recipe, user_runs, user_folder):
    ran = user_runs[recipe].check()
    run = user_folder / "runs" / recipe / "version_0"
    assert sorted(_values(run, "train/loss")) == list(range(EPOCHS * EPOCH_BATCHES))
    validated_at = sorted(_values(run, "val/ppl"))
    assert len(validated_at) == 2 * EPOCHS  # val_check_interval 0.5: mid-epoch and at each epoch's end
    assert validated_at[0] < EPOCH_BATCHES - 1  # the first one inside the first epoch
    names = {path.name for path in (run / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in names and any(name.startswith("best-step") for name in names)
    last = _checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == EPOCHS * EPOCH_BATCHES
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert "Traceback" not in ran.stderr


# ---- interrupt, resume, continue ------------------------------------------------------------------------


def _assert_continues(reference, continued, from_step: int) -> None:
    """``continued`` logged the steps from ``from_step`` on, with the reference run's losses and perplexities."""
    for tag in ("train/loss", "val/ppl"):
        before, after = _values(reference, tag), _values(continued, tag)
        assert after and min(after) >= from_step and set(after) <= set(before), (tag, sorted(after))
        for step, value in after.items():
            assert value == pytest.approx(before[step], rel=1e-6), (tag, step)
    assert sorted(_values(continued, "train/loss")) == list(range(from_step, EPOCHS * EPOCH_BATCHES))


def test_sigterm_then_resume_gives_the_uninterrupted_runs_losses_and_keeps_what_was_written(user_runs, user_folder):
    stopped = user_runs["stopped"]
    assert stopped.signalled and stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    folder = user_folder / "runs" / CHAINED
    (interrupted,) = (folder / "stopped" / "checkpoints").glob("interrupted-step*.ckpt")
    step = int(interrupted.stem.removeprefix("interrupted-step"))
    assert f"--ckpt_path {interrupted.relative_to(user_folder)}" in stopped.stderr.replace(str(user_folder) + "/", "")
    for kept in (folder / "stopped" / "checkpoints").glob("best-step*.ckpt"):  # written before the signal: intact
        assert _checkpoint(kept)["global_step"] <= step
    assert not (folder / "stopped" / "export").exists()  # an interrupted run exports nothing
    user_runs["resumed"].check()
    _assert_continues(folder / "version_0", folder / "resumed", step)
    reference, resumed = (_adapter_tensors(folder / v / "export" / "adapter") for v in ("version_0", "resumed"))
    assert reference.keys() == resumed.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-6, atol=1e-9)


def test_a_run_that_max_steps_ended_mid_epoch_continues_exactly(user_runs, user_folder):
    """``--trainer.max_steps 3`` stops inside the first epoch; continuing its last.ckpt took a fresh epoch."""
    user_runs["short"].check()
    folder = user_folder / "runs" / CHAINED
    assert _checkpoint(folder / "short" / "checkpoints" / "last.ckpt")["global_step"] == 3
    user_runs["continued"].check()
    _assert_continues(folder / "version_0", folder / "continued", 3)


# ---- exports and what loads them ------------------------------------------------------------------------


def test_smarter_export_writes_the_adapter_and_merged_model_of_last_and_best(user_runs, user_folder):
    run = user_folder / "runs" / "qlora" / "version_0"
    for name in ("export-last", "export-best"):
        user_runs[name].check()
    (best,) = run.glob("export-best-step*")
    for folder in (run / "export-last", best):
        assert (folder / "adapter" / "adapter_config.json").is_file()
        assert (folder / "merged" / "config.json").is_file()
        assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    fit_end, last = _adapter_tensors(run / "export" / "adapter"), _adapter_tensors(run / "export-last" / "adapter")
    assert fit_end.keys() == last.keys() and all(torch.equal(fit_end[n], last[n]) for n in fit_end)


def _held_out_text(split: str = "val") -> str:
    from datamodules.gutenberg import read_utf8_text, split_into_chapters, strip_gutenberg_boilerplate

    chapters = {31, 32} if split == "val" else {33, 34}
    book = split_into_chapters(strip_gutenberg_boilerplate(read_utf8_text(BOOK)))
    return "\n\n".join(chapter.text for chapter in book if chapter.number in chapters)


@torch.no_grad()
def own_perplexity(model, tokenizer, text: str, window: int, stride: int) -> float:
    """This test's own sliding-window perplexity: BOS then the text, windows of ``window`` tokens every
    ``stride``, each token scored once, in the window that first reaches it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    sequence = torch.tensor([tokenizer.bos_token_id, *ids])
    total, count, scored_until, start = 0.0, 0, 0, 0
    while scored_until < len(sequence) - 1:
        chunk = sequence[start : start + window + 1]
        logits = model(input_ids=chunk[:-1][None]).logits[0].float()  # (len, vocab)
        first_new = max(scored_until - start, 0)
        targets = chunk[1:][first_new:]
        nll = torch.nn.functional.cross_entropy(logits[first_new : first_new + len(targets)], targets, reduction="sum")
        total, count = total + float(nll), count + len(targets)
        scored_until = start + len(chunk) - 1
        start += stride
    return math.exp(total / count)


def test_the_adapter_through_plain_peft_on_its_base_scores_what_smarter_validate_scores(user_runs, user_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lightning_modules.model_building import ModelSpec, prepare_preset_weights

    user_runs["score-adapter"].check()
    reported = _last(next((user_folder / "runs" / "qlora" / "validate").glob("version_*")), "val/ppl")
    adapter = user_folder / "runs" / "qlora" / "version_0" / "export" / "adapter"
    provenance = json.loads((adapter / "smarter_export.json").read_text())["base"]
    base_folder = prepare_preset_weights(ModelSpec(source=provenance["preset"], preset_seed=provenance["preset_seed"]))
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16, quantization_config=nf4)
    for module in base.modules():  # as the framework loads 4-bit weights on a CPU (see the README's upstream notes)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert own_perplexity(model, tokenizer, _held_out_text(), 1024, 512) == pytest.approx(reported, rel=1e-4)


def test_the_merged_model_through_transformers_alone_scores_what_smarter_validate_scores(user_runs, user_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    user_runs["score-merged"].check()
    reported = _last(next((user_folder / "runs" / "bf16-sdpa" / "validate").glob("version_*")), "val/ppl")
    merged = user_folder / MERGED
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not hasattr(model.config, "quantization_config") and model.dtype == torch.bfloat16
    mine = own_perplexity(model, AutoTokenizer.from_pretrained(merged), _held_out_text(), 1024, 512)
    assert mine == pytest.approx(reported, rel=1e-4)


def test_the_exported_tokenizer_is_the_training_one_and_the_export_scores_the_runs_perplexity(
    trained_tiny, user_runs, user_folder
):
    from transformers import AutoTokenizer

    from datamodules.gutenberg import read_utf8_text, strip_gutenberg_boilerplate
    from lightning_modules import load_tokenizer

    book = strip_gutenberg_boilerplate(read_utf8_text(BOOK))
    exported = AutoTokenizer.from_pretrained(trained_tiny / "export" / "model")
    trained_with = load_tokenizer()  # the SentencePiece model the preset trains with
    assert exported(book, add_special_tokens=False)["input_ids"] == trained_with.encode(book)
    paragraphs = [p for p in book.split("\n\n") if p.strip()]
    assert all(exported(p, add_special_tokens=False)["input_ids"] == trained_with.encode(p) for p in paragraphs)
    assert exported("Ahoy")["input_ids"][0] == trained_with.bos_id  # BOS first, as the model trained
    user_runs["score-tiny-export"].check()
    scored = _last(user_folder / "runs" / "tiny" / "validate" / "version_0", "val/ppl")
    assert scored == pytest.approx(_last(trained_tiny, "val/ppl"), rel=1e-6)


def test_an_adapter_source_trains_further_from_its_weights_and_exports_against_the_real_base(user_runs, user_folder):
    user_runs["fit-from-adapter"].check()
    source = _adapter_tensors(user_folder / "runs" / "qlora" / "version_0" / "export" / "adapter")
    run = user_folder / "runs" / "qlora" / "from-adapter"
    trained = _adapter_tensors(run / "export" / "adapter")
    moved = sum(float((trained[n] - source[n]).norm()) for n in source if "lora_B" in n)
    grown = sum(float(source[n].norm()) for n in source if "lora_B" in n)  # from zeros, in the first run
    assert 0 < moved < 0.5 * grown  # two more steps from the source's weights, not from fresh ones
    provenance = json.loads((run / "export" / "adapter" / "smarter_export.json").read_text())
    assert provenance["base"]["preset"] == "tiny" and provenance["base"]["source"] == "tiny"
    assert json.loads((run / "export" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "tiny"
    )


# ---- predict and compare on the exports -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "run_name", "count"),
    [("predict-tiny-export", "tiny", 4), ("predict-merged", "bf16-sdpa", 4), ("predict-adapter", "qlora", 4)],
)
def test_predict_on_each_export_writes_its_predictions_and_says_where(job, run_name, count, user_runs, user_folder):
    ran = user_runs[job].check()
    (predictions,) = (user_folder / "runs" / run_name / "predict").glob("version_*/predictions.jsonl")
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == count and all(record["completion"] for record in records)
    assert f"wrote {count} predictions to" in ran.stderr and "predictions.jsonl" in ran.stderr


def test_the_six_variant_study_of_the_trained_tiny_model(user_runs, user_folder):
    """The README's loop on a CPU: the quick start's export, compared in its six variants: real perplexity,
    and quantization that shows in KL."""
    from smarter.study import VariantResult
    from smarter.study.report import COLUMNS, PLOT_NAMES

    ran = user_runs["study-of-tiny-export"].check()
    (out,) = [path.parent for path in (user_folder / "study").glob("*/results.json")]
    summary = json.loads((out / "results.json").read_text())
    results = {r["variant"]: VariantResult.from_dict(r) for r in summary["results"]}
    assert set(results) == {f"{q}-{a}" for q in ("bf16", "int8", "nf4") for a in ("eager", "sdpa")}
    for name, result in results.items():
        assert result.ok, (name, result.reason)
        for key in ("load_s", "val_ppl", "val_bits_per_byte", "prefill_tokens_per_s", "ttft_ms",
                    "decode_tokens_per_s", "device_time_per_step_ms", "kl_vs_reference", "top1_agreement",
                    "hf_generate_tokens_per_s"):  # fmt: skip
            assert result.value(key) is not None, (name, key)
        assert result.top_kernels
        assert result.val_ppl < 700  # the trained model, not random weights (which score ~30,000)
    assert results["bf16-sdpa"].kl_vs_reference == 0.0 and results["bf16-sdpa"].top1_agreement == 1.0
    assert results["bf16-eager"].kl_vs_reference < 1e-3  # the same weights, another attention kernel
    assert results["nf4-sdpa"].kl_vs_reference > 10 * results["bf16-eager"].kl_vs_reference  # 4-bit shows
    assert results["int8-sdpa"].kl_vs_reference > results["bf16-eager"].kl_vs_reference
    report = (out / "report.md").read_text()
    assert sum(line.startswith(("| bf16-", "| int8-", "| nf4-")) for line in report.splitlines()) == 6
    assert "Chosen for fine-tuning" in report
    for plot in PLOT_NAMES:
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "tensorboard").iterdir())) == 6
    assert len((out / "results.csv").read_text().splitlines()[0].split(",")) == 2 + len(COLUMNS)
    assert "fine-tune it with" in ran.stdout


@pytest.mark.parametrize(("job", "variants"), [("study-of-exports", 2), ("study-of-adapter", 1)])
def test_compare_measures_each_variant_of_an_export(job, variants, user_runs, user_folder):
    user_runs[job].check()
    folder = user_folder / job.replace("study-of-exports", "study-merged").replace("study-of-adapter", "study-adapter")
    results = json.loads((folder / "results.json").read_text())["results"]
    assert len(results) == variants
    for result in results:
        assert result["status"] == "ok", result.get("reason")
        assert 1 < result["val_ppl"] < 1e5


def test_the_subclassing_example_of_the_readme_runs(user_runs, user_folder):
    user_runs["subclass"].check()
    (run,) = [
        r
        for r in (user_folder / "runs" / "tiny").glob("version_*")
        if "z_loss_coef" in (r / "hparams.yaml").read_text()
    ]
    assert "train/z_loss" in scalars(run)


# ---- your own data: the README's worked example ----------------------------------------------------------


def _predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_worked_example_fine_tunes_the_book_model_on_questions_made_from_the_book(user_runs, user_folder):
    for job in ("book-qa", "qa-score-before", "qa-predict-before", "qa-fit", "qa-score-after", "qa-predict-after"):
        user_runs[job].check()
    samples = [json.loads(line) for line in (user_folder / "data" / "book-qa.jsonl").read_text().splitlines()]
    assert len(samples) > 300 and all(s["prompt"].strip() and s["response"].strip() for s in samples)
    runs = user_folder / "runs" / "tiny-instructions"
    # nothing dropped silently: every sample of the set is counted in its split, as kept (none is over the block)
    fit = scalars(runs / "version_0")
    counted = {split: fit[f"data/{split}_samples_kept"][0][1] for split in ("train", "val", "test")}
    assert sum(counted.values()) == len(samples)
    assert "samples train: " in user_runs["qa-fit"].stdout + user_runs["qa-fit"].stderr
    # perplexity on the held-out answers goes down, and the export scores what the run scored
    before = scalars(runs / "validate" / "version_0")["val/ppl"][-1][1]
    after = scalars(runs / "validate" / "version_1")["val/ppl"][-1][1]
    assert after < 0.8 * before, (before, after)
    assert after == pytest.approx(fit["val/ppl"][-1][1], rel=1e-4)
    # the answers to the same held-out questions, before and after, each beside its reference
    old = _predictions(runs / "predict" / "version_0" / "predictions.jsonl")
    new = _predictions(runs / "predict" / "version_1" / "predictions.jsonl")
    answers = {s["prompt"]: s["response"] for s in samples}
    assert len(old) == len(new) == 8
    for a, b in zip(old, new, strict=True):
        assert a["prompt"] == b["prompt"] and a["reference"] == b["reference"] == answers[a["prompt"]]
    assert [p["completion"] for p in old] != [p["completion"] for p in new]
    # the fine-tuned model answers and stops at its EOS; the book model runs on to the token limit
    assert sum(p["new_tokens"] < 32 for p in new) > sum(p["new_tokens"] < 32 for p in old)


def test_qlora_on_an_instruction_set_is_one_command(user_runs, user_folder):
    user_runs["qlora-on-qa"].check()
    run = user_folder / "runs" / "qlora" / "instructions"
    logged = scalars(run)
    assert sorted(dict(logged["train/loss"])) == list(range(EPOCHS * EPOCH_BATCHES))
    assert len(logged["val/ppl"]) == 2 * EPOCHS  # the recipe's own validations, on the held-out answers
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert "class_path: datamodules.InstructionDataModule" in (run / "config.yaml").read_text()


def test_compare_scores_the_variants_on_your_own_text(user_runs, user_folder):
    user_runs["study-of-own-text"].check()
    out = user_folder / "study-own-text"
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"]["data"] == "docs/**/*.md"
    assert [r["status"] for r in summary["results"]] == ["ok", "ok"]
    assert "corpus docs/**/*.md" in (out / "logs" / "bf16-sdpa.log").read_text()
    assert "Scored on: docs/**/*.md" in (out / "report.md").read_text()
    assert "--data.path 'docs/**/*.md'" in summary["fit_command"]  # the fine-tuning command keeps the data
    (book,) = [path.parent for path in (user_folder / "study").glob("*/results.json")]
    book_ppl = {r["variant"]: r["val_ppl"] for r in json.loads((book / "results.json").read_text())["results"]}
    own_ppl = {r["variant"]: r["val_ppl"] for r in summary["results"]}
    assert own_ppl["bf16-sdpa"] != pytest.approx(book_ppl["bf16-sdpa"], rel=1e-3)  # another text was scored


# ---- the README -----------------------------------------------------------------------------------------


def test_every_readme_command_that_runs_on_a_cpu_was_run_as_written(user_runs):
    commands = readme_commands()
    cpu = [command.text for command in commands if command.kind == "cpu"]
    assert len(cpu) >= 6
    for text in cpu:
        assert any(run == text or run.startswith(text + " ") for run in EXECUTED), f"README command not run: {text}"
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    for command in commands:
        if command.kind == "tests":
            assert command.text.split("&&")[-1].strip() in ci  # CI runs the README's test command
        if command.kind == "install" and command.text.startswith("pip install"):
            assert command.text.replace("pip install", "python -m pip install --quiet") in ci, command.text


def test_the_readme_commands_that_need_a_gpu_are_the_recipe_matrixs():
    import recipe_matrix

    matrix = {step.command for step in recipe_matrix.plan_steps()}
    for command in readme_commands():
        if command.kind == "gpu":
            assert any(step.startswith(command.text) for step in matrix), f"not in the GPU matrix: {command.text}"
