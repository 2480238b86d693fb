"""``smarter compare``: the whole study on the tiny preset, its report, and its failure handling."""

from __future__ import annotations

import csv
import json
import math
import os

import matplotlib.image
import pytest

from conftest import REPO_ROOT
from smarter.cli import main
from smarter.errors import ConfigError
from smarter.study import StudySettings, run_study

FAST = ["--new_tokens", "6", "--repeats", "1", "--prefill_tokens", "64", "--kl_tokens", "256"]
PLOTS = [
    "perplexity",
    "decode_tokens_per_s",
    "prefill_tokens_per_s",
    "peak_memory",
    "device_time_per_step",
    "top_kernels",
    "speed_vs_quality",
]


@pytest.mark.slow
def test_the_six_variant_study_on_the_tiny_preset(tmp_path, monkeypatch, book_path, capsys):
    monkeypatch.chdir(tmp_path)
    main(["compare", "--overrides", "--model.source tiny", "--output_dir", "study", *FAST])
    out = tmp_path / "study"
    summary = json.loads((out / "results.json").read_text())
    results = {r["variant"]: r for r in summary["results"]}
    assert set(results) == {f"{q}-{a}" for q in ("bf16", "int8", "nf4") for a in ("eager", "sdpa")}
    numeric = [
        "load_s",
        "val_ppl",
        "val_bits_per_byte",
        "prefill_tokens_per_s",
        "ttft_ms",
        "decode_tokens_per_s",
        "device_time_per_step_ms",
        "kl_vs_reference",
        "top1_agreement",
        "hf_generate_tokens_per_s",
    ]
    for name, result in results.items():
        assert result["status"] == "ok", (name, result.get("reason"))
        for key in numeric:
            assert math.isfinite(result[key]), (name, key)
        assert result["top_kernels"]
    assert results["bf16-sdpa"]["kl_vs_reference"] == 0.0
    assert results["bf16-sdpa"]["top1_agreement"] == 1.0
    assert results["nf4-sdpa"]["kl_vs_reference"] > 0  # 4-bit weights really differ
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6
    report = (out / "report.md").read_text()
    assert (
        sum(
            line.startswith("| bf16-") or line.startswith("| int8-") or line.startswith("| nf4-")
            for line in report.splitlines()
        )
        == 6
    )
    assert "Chosen for fine-tuning" in report and "smarter fit -c configs/finetune/qlora.yaml" in report
    for plot in PLOTS:
        path = out / "plots" / f"{plot}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[0] > 100
    assert len(list((out / "tensorboard").iterdir())) == 6
    assert "fine-tune it with" in capsys.readouterr().out


def test_failed_variants_are_reported_and_the_rest_complete(tmp_path, monkeypatch, book_path):
    monkeypatch.chdir(tmp_path)
    # variant processes import the user's own modules (here tests/custom_modules.py) like any package
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  source: tiny\n  quantization: nf4\n  dtype: float32\n")
    pinned = tmp_path / "bf16-sdpa-math.yaml"  # a variant added by subclassing: SDPA pinned to the math kernel
    pinned.write_text(
        "model:\n  class_path: lightning_modules.attention_variants.PinnedSdpaModule\n"
        "  init_args: {sdpa_backend: math, source: mistral-7b, attention: sdpa, dtype: bfloat16}\n"
        "data: {block_size: 1024, eval_stride: 512, batch_size: 4, eval_batch_size: 4}\n"
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
    results = {r["variant"]: r for r in summary["results"]}
    assert results["missing"]["status"] == "failed" and "config not found" in results["missing"]["reason"]
    assert results["broken"]["status"] == "failed" and "computes in 16-bit" in results["broken"]["reason"]
    assert results["oom"]["status"] == "failed"
    assert results["oom"]["reason"].startswith("out of memory: CUDA out of memory. Tried to allocate 28.00 GiB")
    assert results["bf16-sdpa"]["status"] == "ok" and results["bf16-sdpa-math"]["status"] == "ok"
    assert results["bf16-sdpa-math"]["kl_vs_reference"] < 1e-3  # same model, another SDPA kernel
    report = (tmp_path / "study" / "report.md").read_text()
    assert "| missing | failed: config not found" in report

    # measured results are never overwritten by accident, and resuming keeps them
    with pytest.raises(ConfigError, match="already holds a study"):
        run_study(settings)
    before = json.loads((tmp_path / "study" / "variants" / "bf16-sdpa.json").read_text())
    settings.resume = True
    resumed = run_study(settings)
    kept = {r["variant"]: r for r in resumed["results"]}["bf16-sdpa"]
    assert kept["load_s"] == before["load_s"]


def test_an_empty_prompt_file_is_refused_before_any_variant_runs(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="holds no prompt"):
        run_study(StudySettings(prompts_file=str(empty), output_dir=str(tmp_path / "study")))
    assert not (tmp_path / "study").exists()
