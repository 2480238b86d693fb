"""``smarter compare``: the decision rule, the fit command and the report on fabricated results; the
whole study on the tiny preset; its failure handling."""

from __future__ import annotations

import json
import os
import shlex

import pytest

from conftest import REPO_ROOT
from foundation import ConfigError
from helpers import scalars
from smarter.cli import main
from smarter.study import KernelShare, StudySettings, VariantResult, choose_best, fit_command, run_study
from smarter.study.report import COLUMNS, markdown_table

FAST = ["--new_tokens", "6", "--repeats", "1", "--prefill_tokens", "64", "--kl_tokens", "256"]


def _result(name: str, ppl: float, decode: float, peak: float, **extra) -> VariantResult:
    return VariantResult(
        variant=name,
        config=f"variants/{name}.yaml",
        val_ppl=ppl,
        decode_tokens_per_s=decode,
        peak_allocated_gib=peak,
        model={"quantization": name.split("-")[0], "attention": name.split("-")[1], "dtype": "bfloat16"},
        **extra,
    )


FABRICATED = [
    _result("bf16-sdpa", ppl=10.0, decode=40.0, peak=14.0, kl_vs_reference=0.0),
    _result("bf16-eager", ppl=10.0, decode=38.0, peak=14.5, kl_vs_reference=0.0001),
    _result("nf4-sdpa", ppl=10.4, decode=45.0, peak=4.0, kl_vs_reference=0.02),
    _result("nf4-eager", ppl=10.4, decode=45.0, peak=3.9, kl_vs_reference=0.02),
    _result("int8-sdpa", ppl=12.0, decode=60.0, peak=8.0, kl_vs_reference=0.3),  # too far from the reference
    VariantResult.failed("int8-eager", "out of memory: CUDA out of memory"),
]


def test_the_chooser_takes_the_fastest_within_tolerance_and_breaks_ties_by_memory():
    best, rule = choose_best(FABRICATED, reference="bf16-sdpa", tolerance=0.05)
    assert best.variant == "nf4-eager"  # int8-sdpa is faster but 20 % worse; nf4-eager ties nf4-sdpa, less memory
    assert "within 5% of bf16-sdpa (10 -> limit 10.5)" in rule
    best, _ = choose_best(FABRICATED, reference="bf16-sdpa", tolerance=0.25)
    assert best.variant == "int8-sdpa"
    without_reference = [r for r in FABRICATED if r.variant != "bf16-sdpa"]
    best, rule = choose_best(without_reference, reference="bf16-sdpa", tolerance=0.05)
    assert best.variant == "int8-sdpa" and "no perplexity limit" in rule
    assert choose_best(FABRICATED[-1:], reference="bf16-sdpa", tolerance=0.05)[0] is None


def test_the_fit_command_keeps_the_variants_own_config_and_adds_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    command = fit_command(FABRICATED[2], overrides="--model.source tiny")
    assert command == (
        "smarter fit -c configs/variants/nf4-sdpa.yaml -c configs/finetune/lora.yaml --model.source tiny"
    )
    extension = VariantResult(variant="bf16-sdpa-efficient", config="configs/extensions/bf16-sdpa-efficient.yaml")
    assert "-c configs/extensions/bf16-sdpa-efficient.yaml -c configs/finetune/lora.yaml" in fit_command(extension)


def test_the_report_table_bolds_the_best_value_of_each_column_and_explains_failures():
    table = markdown_table(FABRICATED).splitlines()
    assert table[0].startswith("| variant | load s |") and len(table) == 2 + len(FABRICATED)
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table[2:]}
    decode_column = [c.key for c in COLUMNS].index("decode_tokens_per_s") + 1
    cells = {n: line.strip("|").split(" | ")[decode_column].strip() for n, line in rows.items() if "failed" not in line}
    assert cells["int8-sdpa"] == "**60.0**" and cells["bf16-sdpa"] == "40.0"
    assert "**3.9**" in rows["nf4-eager"]  # the least peak memory
    assert rows["int8-eager"].startswith("| int8-eager | failed: out of memory")


def test_the_decode_plots_show_each_variants_fastest_decoder_which_the_rule_ranks_by(tmp_path, monkeypatch):
    from smarter.study import report

    drawn = {}
    monkeypatch.setattr(report, "_bar_chart", lambda plt, results, key, *rest: drawn.setdefault(key, results))
    slow_loop_fast_decoder = _result("nf4-sdpa", 10.4, 33.0, 4.9, fast_decode_tokens_per_s=263.0)
    report.write_plots([FABRICATED[0], slow_loop_fast_decoder], tmp_path)
    assert "best_decode_tokens_per_s" in drawn and "decode_tokens_per_s" not in drawn
    assert [r.value("best_decode_tokens_per_s") for r in drawn["best_decode_tokens_per_s"]] == [40.0, 263.0]
    assert choose_best([FABRICATED[0], slow_loop_fast_decoder], "bf16-sdpa", 0.05)[0].variant == "nf4-sdpa"


def test_results_round_trip_through_json():
    original = _result("nf4-sdpa", 10.0, 45.0, 4.0, top_kernels=[KernelShare("gemm", 1.5, 3, 0.4)])
    restored = VariantResult.from_dict(json.loads(json.dumps(original.to_dict())))
    assert restored == original and restored.peak_gib == 4.0
    settings = StudySettings(variants=["a"], overrides="--model.source tiny", repeats=2)
    assert StudySettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


def test_failed_variants_are_reported_the_rest_complete_and_the_chosen_extension_fits(tmp_path, monkeypatch, book_path):
    monkeypatch.chdir(tmp_path)
    # variant processes import the user's own modules (here tests/custom_modules.py) like any package
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  source: tiny\n  quantization: nf4\n  dtype: float32\n")
    pinned = tmp_path / "bf16-sdpa-math.yaml"  # a variant added by subclassing: SDPA pinned to the math kernel
    pinned.write_text(
        f"extends: {REPO_ROOT / 'configs/base/mistral-7b.yaml'}\n"
        "model:\n  class_path: lightning_modules.attention_variants.PinnedSdpaModule\n"
        "  init_args: {sdpa_backend: math}\n"
    )
    out_of_memory = tmp_path / "oom.yaml"
    out_of_memory.write_text("model:\n  class_path: custom_modules.OutOfMemoryMistralModule\n")
    settings = StudySettings(
        variants=["bf16-sdpa", str(tmp_path / "missing.yaml"), str(broken), str(out_of_memory), str(pinned)],
        output_dir=str(tmp_path / "study"),
        new_tokens=4,
        repeats=1,
        prefill_tokens=32,
        kl_tokens=128,
        overrides="--model.source tiny",
    )
    summary = run_study(settings)
    results = {r.variant: r for r in summary.results}
    assert results["missing"].status == "failed" and "config not found" in results["missing"].reason
    assert results["broken"].status == "failed" and "computes in 16-bit" in results["broken"].reason
    assert results["oom"].status == "failed"
    assert results["oom"].reason.startswith("out of memory: CUDA out of memory. Tried to allocate 28.00 GiB")
    assert results["bf16-sdpa"].ok and results["bf16-sdpa-math"].ok
    assert results["bf16-sdpa-math"].kl_vs_reference < 1e-3  # same model, another SDPA kernel
    report = (tmp_path / "study" / "report.md").read_text()
    assert "| missing | failed: config not found" in report

    # the fit command for the extension runs as printed, its class kept
    assert summary.chosen is not None and summary.fit_command.startswith("smarter fit -c ")
    args = shlex.split(fit_command(results["bf16-sdpa-math"], settings.overrides))
    assert args[:2] == ["smarter", "fit"] and (tmp_path / args[3]).resolve() == pinned.resolve()
    fit_args = [*args[2:], "--data.block_size", "64", "--data.eval_stride", "32", "--trainer.max_steps", "2"]
    main(["fit", *fit_args, "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"])
    run = next((tmp_path / "runs" / "bf16-sdpa-math").glob("version_*"))
    config = (run / "config.yaml").read_text()
    assert "PinnedSdpaModule" in config and "sdpa_backend: math" in config
    assert "r: 16" in config and "source: tiny" in config  # the LoRA recipe and the study's overrides
    assert "train/loss" in scalars(run)

    # measured results are never overwritten by accident, and resuming keeps them
    with pytest.raises(ConfigError, match="already holds a study"):
        run_study(settings)
    before = json.loads((tmp_path / "study" / "variants" / "bf16-sdpa.json").read_text())
    settings.resume = True
    resumed = run_study(settings)
    kept = {r.variant: r for r in resumed.results}["bf16-sdpa"]
    assert kept.load_s == before["load_s"]


def test_an_empty_prompt_file_is_refused_before_any_variant_runs(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="holds no prompt"):
        run_study(StudySettings(prompts_file=str(empty), output_dir=str(tmp_path / "study")))
    assert not (tmp_path / "study").exists()


def test_the_study_builds_each_variant_for_its_fast_decoder():
    """One model serves evaluation and both decoders; on a GPU the compiled decode step needs it built
    without Liger (kernels auto), on a CPU nothing changes."""
    from unittest import mock

    import torch

    from lightning_modules import MistralModule
    from lightning_modules.execution_plan import Platform
    from smarter.study.probe import plan_for_the_study

    gpu = Platform(device="cuda", capability=(9, 0), liger=True, triton=True)
    with mock.patch.object(Platform, "detect", classmethod(lambda cls, where="cpu": gpu)):
        plan = plan_for_the_study(MistralModule(source="tiny", kernels="auto"), torch.device("cuda"))
        assert (plan.kernels, plan.decoder, plan.matvec, plan.compile) == ("off", "static-compiled", "triton", "off")
        assert (
            plan_for_the_study(MistralModule(source="tiny", kernels="liger"), torch.device("cuda")).kernels == "liger"
        )
    on_cpu = plan_for_the_study(MistralModule(source="tiny", kernels="auto"), torch.device("cpu"))
    assert (on_cpu.kernels, on_cpu.decoder, on_cpu.matvec) == ("off", "static", "library")


def test_a_study_whose_every_variant_failed_exits_1_and_a_multi_line_reason_stays_in_its_cell(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["compare", "--variants", f"[{tmp_path / 'missing.yaml'}]", "--output_dir", str(tmp_path / "study")])
    assert stopped.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smarter: error:")]
    assert len(errors) == 1 and "every variant failed (1; the first, missing: config not found" in errors[0]
    assert (tmp_path / "study" / "report.md").is_file()  # what was measured (nothing) is still reported
    multi = VariantResult.failed("nf4-eager", "Traceback (most recent call last):\n  boom | crash\nValueError: x")
    table = markdown_table([FABRICATED[0], multi]).splitlines()
    assert len(table) == 4 and table[-1].startswith("| nf4-eager | failed: Traceback (most recent call last): ")
    assert table[-1].count("|") == table[0].count("|")  # one row, as many cells as the header
