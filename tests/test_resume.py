"""Fine-tuning you can trust: exact resume (mid-epoch, schedule, data order, random generators), a clean
stop on SIGTERM, atomic checkpoints under SIGKILL, divergence that stops the run, no silent substitution."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from helpers import QUIET, TINY, run_smarter, scalars
from lightning_modules.checkpoints import read_checkpoint
from lightning_modules.schedules import WarmupCosine
from smarter.cli import main

# 5 batches an epoch, so step 7 is in the middle of the second epoch; LoRA dropout makes the random
# generators matter; the learning rate is logged every step.
SHAPE = [
    *["--data.block_size", "64", "--data.batch_size", "4", "--trainer.limit_train_batches", "5"],
    *["--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1", "--trainer.max_epochs", "100"],
    *["--model.lora.r", "4", "--model.lora.alpha", "8", "--model.lora.dropout", "0.3", "--model.warmup_steps", "3"],
]
EVERY_7 = [
    "--trainer.callbacks+=ModelCheckpoint",
    *["--trainer.callbacks.every_n_train_steps", "7", "--trainer.callbacks.save_top_k", "-1"],
    *["--trainer.callbacks.filename", "at{step}"],
]


def _fit(folder: Path, monkeypatch, *args: str) -> int:
    """``smarter fit`` on the tiny preset in ``folder``; the exit status (0 when it returns)."""
    monkeypatch.chdir(folder)
    try:
        main(["fit", "-c", TINY, *SHAPE, *QUIET, *args])
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _run(folder: Path, version: str) -> Path:
    return folder / "runs" / "tiny" / version


def _assert_same_curve(reference: Path, resumed: Path, first_step: int) -> None:
    a, b = scalars(reference), scalars(resumed)
    for tag in ("train/loss", "lr-AdamW"):
        before, after = dict(a[tag]), dict(b[tag])
        assert min(after) == first_step and set(after) <= set(before), tag
        for step, value in after.items():
            assert value == pytest.approx(before[step], rel=1e-6), (tag, step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, book_path) -> Path:
    """12 LoRA steps straight through, with a checkpoint at step 7 (mid-epoch)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        assert (
            _fit(folder, patch, "--trainer.max_steps", "12", "--trainer.logger.init_args.version", "full", *EVERY_7)
            == 0
        )
    return folder


def test_resuming_mid_epoch_continues_the_same_curve(uninterrupted, tmp_path, monkeypatch):
    checkpoint = next((_run(uninterrupted, "full") / "checkpoints").glob("at*7.ckpt"))
    assert _fit(tmp_path, monkeypatch, "--trainer.max_steps", "12", "--ckpt_path", str(checkpoint)) == 0
    _assert_same_curve(_run(uninterrupted, "full"), next((tmp_path / "runs" / "tiny").glob("version_*")), 7)


def test_sigterm_writes_a_checkpoint_exits_nonzero_and_resumes_exactly(uninterrupted, tmp_path, monkeypatch, capsys):
    stop = ["--trainer.callbacks+=custom_modules.SignalAtStep", "--trainer.callbacks.step", "7"]
    code = _fit(tmp_path, monkeypatch, "--trainer.max_steps", "12", "--trainer.logger.init_args.version", "a", *stop)
    assert code == 128 + 15
    checkpoint = _run(tmp_path, "a") / "checkpoints" / "interrupted-step7.ckpt"
    message = capsys.readouterr().err
    written = checkpoint.relative_to(tmp_path)
    assert f"smarter: stopped: SIGTERM received: stopped after step 7; checkpoint written to {written}" in message
    assert not (_run(tmp_path, "a") / "export").exists()  # an interrupted run exports nothing
    code = _fit(
        tmp_path,
        monkeypatch,
        "--trainer.max_steps",
        "12",
        "--trainer.logger.init_args.version",
        "b",
        "--ckpt_path",
        str(checkpoint),
    )
    assert code == 0
    _assert_same_curve(_run(uninterrupted, "full"), _run(tmp_path, "b"), 7)
    assert (_run(tmp_path, "b") / "export" / "adapter" / "adapter_config.json").is_file()


def test_a_second_interrupted_run_in_the_same_folder_keeps_the_first_ones_checkpoint(
    tmp_path, monkeypatch, capsys, book_path
):
    """Two runs with a pinned logger version share a checkpoint folder; both stopped after step 2."""
    stop = ["--trainer.callbacks+=custom_modules.SignalAtStep", "--trainer.callbacks.step", "2"]
    same = ["--trainer.max_steps", "4", "--trainer.logger.init_args.version", "same", *stop]
    assert _fit(tmp_path, monkeypatch, *same) == 128 + 15
    first = _run(tmp_path, "same") / "checkpoints" / "interrupted-step2.ckpt"
    kept = (first.stat().st_size, first.stat().st_mtime_ns)
    capsys.readouterr()
    assert _fit(tmp_path, monkeypatch, *same) == 128 + 15
    second = first.with_name("interrupted-step2-v1.ckpt")
    assert f"checkpoint written to {second.relative_to(tmp_path)}" in capsys.readouterr().err
    assert (first.stat().st_size, first.stat().st_mtime_ns) == kept and second.is_file()


def test_sigterm_inside_an_accumulation_window_stops_at_its_step_end_and_resumes_exactly(
    tmp_path, monkeypatch, capsys, book_path
):
    """With two batches a step, a signal after the first batch of a step stops after the second: a checkpoint
    between them would lose the first batch's gradients (the resumed run stepped on the second alone)."""
    # 5 batches an epoch: steps end after batches 2, 4 and 5 (the epoch's last batch steps alone), 7, 9, 10
    accumulate = ["--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "6"]
    assert _fit(tmp_path, monkeypatch, *accumulate, "--trainer.logger.init_args.version", "full") == 0
    stop = ["--trainer.callbacks+=custom_modules.SignalAtStep", "--trainer.callbacks.train_batch", "3"]
    assert _fit(tmp_path, monkeypatch, *accumulate, "--trainer.logger.init_args.version", "a", *stop) == 128 + 15
    assert "SIGTERM received: stopped after step 2; checkpoint written to" in capsys.readouterr().err
    (checkpoint,) = (_run(tmp_path, "a") / "checkpoints").glob("interrupted-*.ckpt")
    assert checkpoint.name == "interrupted-step2.ckpt"
    resume = ["--trainer.logger.init_args.version", "b", "--ckpt_path", str(checkpoint)]
    assert _fit(tmp_path, monkeypatch, *accumulate, *resume) == 0
    _assert_same_curve(_run(tmp_path, "full"), _run(tmp_path, "b"), 2)


def test_a_longer_resumed_run_follows_its_own_schedule(tmp_path, monkeypatch, book_path):
    assert _fit(tmp_path, monkeypatch, "--trainer.max_steps", "8", "--trainer.logger.init_args.version", "short") == 0
    (checkpoint,) = (_run(tmp_path, "short") / "checkpoints").glob("*.ckpt")
    code = _fit(
        tmp_path,
        monkeypatch,
        "--trainer.max_steps",
        "16",
        "--trainer.logger.init_args.version",
        "long",
        "--ckpt_path",
        str(checkpoint),
    )
    assert code == 0
    learning_rates = dict(scalars(_run(tmp_path, "long"))["lr-AdamW"])
    schedule = WarmupCosine(warmup_steps=3, total_steps=16, min_ratio=0.1)
    for step in range(8, 16):
        assert learning_rates[step] == pytest.approx(3e-3 * schedule(step), rel=1e-6), step
    assert learning_rates[12] > 2 * 3e-3 * 0.1  # not stuck at the minimum of the 8-step schedule


def test_an_explicit_setting_wins_over_the_checkpoints_and_is_reported(uninterrupted, tmp_path, monkeypatch, capsys):
    checkpoint = next((_run(uninterrupted, "full") / "checkpoints").glob("at*7.ckpt"))
    code = _fit(
        tmp_path,
        monkeypatch,
        "--trainer.max_steps",
        "9",
        "--model.learning_rate",
        "0.001",
        "--ckpt_path",
        str(checkpoint),
    )
    assert code == 0
    assert (
        "smarter: note: model.learning_rate is 0.003 in the checkpoint and 0.001 here; using the configured value."
        in capsys.readouterr().err
    )
    learning_rates = dict(scalars(next((tmp_path / "runs" / "tiny").glob("version_*")))["lr-AdamW"])
    schedule = WarmupCosine(warmup_steps=3, total_steps=9, min_ratio=0.1)
    assert learning_rates[7] == pytest.approx(1e-3 * schedule(7), rel=1e-6)


@pytest.mark.parametrize("check", ["synchronous", "deferred"])
def test_a_nan_stops_the_run_naming_the_step_and_writes_no_bad_checkpoint(check, tmp_path, monkeypatch, capsys):
    """Read before the update (a CPU's plan), or skipped on the device and read a step later (a GPU's plan,
    forced here): either way the run stops naming the step that diverged, and no checkpoint comes from it."""
    every_step = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1"]
    every_step += ["--trainer.callbacks.save_top_k", "-1"]
    if check == "deferred":
        (tmp_path / "deferred.yaml").write_text("model:\n  class_path: custom_modules.DeferredDivergenceCheck\n")
        every_step += ["-c", str(tmp_path / "deferred.yaml")]
    code = _fit(tmp_path, monkeypatch, "--trainer.max_steps", "30", "--model.learning_rate", "1e4", *every_step)
    assert code == 3
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("smarter:")]
    assert line.startswith("smarter: error: training diverged: ") and " at step " in line
    step = int(line.split(" at step ")[1].split()[0])
    run = next((tmp_path / "runs" / "tiny").glob("version_*"))
    saved = list((run / "checkpoints").glob("*.ckpt"))
    assert saved  # the good steps before the divergence were kept
    for path in saved:
        checkpoint = read_checkpoint(path)
        assert checkpoint["global_step"] < step, path.name  # none from the step that diverged, nor after it
        for name, tensor in checkpoint["state_dict"].items():
            assert torch.isfinite(tensor).all(), (path.name, name)
    assert not (run / "export").exists()


def test_the_deferred_check_trains_as_the_synchronous_one_and_stops_a_step_later(tmp_path, monkeypatch, capsys):
    """The GPU's plan (fused AdamW, the verdict read at the next step) forced on the CPU: the same losses as
    the CPU's plan; a divergence with no checkpoint in between is named at the next step, and nothing exports."""
    deferred = tmp_path / "deferred.yaml"
    deferred.write_text("model:\n  class_path: custom_modules.DeferredDivergenceCheck\n")
    curves = []
    for name, extra in (("sync", []), ("deferred", ["-c", str(deferred)])):
        (tmp_path / name).mkdir()
        assert _fit(tmp_path / name, monkeypatch, "--trainer.max_steps", "4", *extra) == 0
        curves.append(dict(scalars(next((tmp_path / name / "runs" / "tiny").glob("version_*")))["train/loss"]))
    assert curves[0].keys() == curves[1].keys() and len(curves[0]) >= 3
    assert all(curves[1][k] == pytest.approx(v, rel=1e-4) for k, v in curves[0].items())
    (tmp_path / "nan").mkdir()
    capsys.readouterr()
    code = _fit(
        tmp_path / "nan", monkeypatch, "--trainer.max_steps", "30", "--model.learning_rate", "1e4", "-c", str(deferred)
    )
    assert code == 3
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("smarter:")]
    assert line.startswith("smarter: error: training diverged: ") and " at step " in line
    assert not list((tmp_path / "nan" / "runs").rglob("export"))


def test_sigkill_during_a_save_leaves_the_earlier_checkpoint_loadable(tmp_path, book_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    args = [
        "fit",
        "-c",
        TINY,
        *SHAPE,
        *QUIET,
        "--trainer.max_steps",
        "6",
        "--trainer.plugins=custom_modules.KilledWhileSaving",
    ]
    args += ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "2"]
    args += ["--trainer.callbacks.filename", "latest", "--trainer.callbacks.enable_version_counter", "false"]
    result = run_smarter(*args, cwd=tmp_path, env=env)
    assert result.returncode == -9  # killed in the middle of writing the second checkpoint
    (latest,) = (tmp_path / "runs").rglob("latest.ckpt")
    checkpoint = read_checkpoint(latest)
    assert checkpoint["global_step"] == 2  # the first save, whole
    assert all(math.isfinite(float(t.float().sum())) for t in checkpoint["state_dict"].values())


def test_sigterm_in_predict_keeps_the_predictions_written_and_no_secret_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_written")
    stop = ["--trainer.callbacks+=custom_modules.SignalAtStep", "--trainer.callbacks.predict_batch", "1"]
    with pytest.raises(SystemExit) as stopped:
        main(["predict", "-c", TINY, *QUIET, "--model.generation.max_new_tokens", "4", *stop])
    assert stopped.value.code == 128 + 15
    assert "smarter: stopped: SIGTERM received: predict stopped after the current batch" in capsys.readouterr().err
    (predictions,) = (tmp_path / "runs").rglob("predictions.jsonl")
    assert len(predictions.read_text().splitlines()) == 2  # prompts 1 and 2 of 4, each written whole
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert b"hf_secret_never_written" not in path.read_bytes(), path


def test_sigterm_to_compare_takes_its_probe_down_and_the_study_resumes(tmp_path, book_path):
    import signal
    import subprocess
    import sys
    import time

    args = ["compare", "--overrides", "--model.source tiny", "--variants", "[bf16-sdpa, nf4-sdpa]"]
    args += ["--output_dir", "study", "--new_tokens", "4", "--repeats", "1", "--prefill_tokens", "32"]
    args += ["--kl_tokens", "64", "--hf_baseline", "false"]
    study = subprocess.Popen([sys.executable, "-m", "smarter.cli", *args], cwd=tmp_path, stderr=subprocess.PIPE)
    lock = tmp_path / "study" / "variants" / ".bf16-sdpa.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.2)
    probe_pid = int(lock.read_text().split()[1])
    study.send_signal(signal.SIGTERM)
    _, stderr = study.communicate(timeout=60)
    assert study.returncode == 128 + 15
    assert "smarter: stopped: SIGTERM received: the study stopped" in stderr.decode()
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(probe_pid, 0)  # the probe went down with the study
    resumed = run_smarter(*args, "--resume", "true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "study" / "report.md").is_file()


@pytest.mark.parametrize(
    ("failure", "cause"), [("out-of-memory", "out of GPU memory"), ("disk-full", "the disk is full")]
)
def test_a_failing_machine_ends_the_run_in_one_line_naming_the_last_checkpoint_and_a_log(
    failure, cause, tmp_path, monkeypatch, capsys, book_path
):
    """Out of memory or a full disk after step 3, a checkpoint written at step 2: one line (exit 1) naming the
    cause and that checkpoint, the traceback in a log file of the run's folder, the checkpoint intact."""
    every_2 = [arg.replace("7", "2") for arg in EVERY_7]
    fail = ["--trainer.callbacks+=custom_modules.FailAtStep", "--trainer.callbacks.failure", failure]
    code = _fit(tmp_path, monkeypatch, "--trainer.max_steps", "12", *every_2, *fail)
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smarter: error:")]
    assert len(errors) == 1 and f"smarter: error: {cause} during fit at step 3" in errors[0]
    (checkpoint,) = (_run(tmp_path, "version_0") / "checkpoints").glob("at*2.ckpt")
    assert f"the last checkpoint is {checkpoint.relative_to(tmp_path)}" in errors[0]
    assert read_checkpoint(checkpoint)["global_step"] == 2
    (log,) = _run(tmp_path, "version_0").glob("smarter-error-*.log")
    assert str(log.relative_to(tmp_path)) in errors[0] and "Traceback" in log.read_text()


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch, book_path):
    fail = ["--trainer.callbacks+=custom_modules.FailAtStep", "--trainer.callbacks.failure", "bug"]
    with pytest.raises(ZeroDivisionError):
        _fit(tmp_path, monkeypatch, "--trainer.max_steps", "4", *fail)
