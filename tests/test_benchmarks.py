"""The side-by-side benchmark's bookkeeping: file names, rounds, the scaling column, and a CPU smoke run."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import pytest
import speed_side_by_side as bench
import torch

ONE = "fit:configs/finetune/qlora-fast.yaml"
DDP = "fit:configs/finetune/qlora-fast.yaml -c configs/distributed/ddp.yaml"


def test_workloads_that_differ_only_past_the_readable_part_get_their_own_files():
    long = DDP + " --trainer.callbacks+=benchmarks.step_diagnostics.GpuPhaseTimer"
    first, second = long, long + " --trainer.strategy.init_args.bucket_cap_mb 1000"
    assert bench._file_name(first)[:100] == bench._file_name(second)[:100]  # the readable part is cut the same
    assert bench._file_name(first) != bench._file_name(second)
    assert bench._file_name(first) == bench._file_name(first)  # the same workload finds its file again
    assert bench._file_name(first).endswith(".json") and "/" not in bench._file_name(first)


def test_rounds_keep_every_figure_and_report_the_median_round():
    rounds = [
        {ONE: {"tokens_per_s": 100.0, "round": 1}, DDP: {"tokens_per_s": 190.0, "round": 1}},
        {ONE: {"tokens_per_s": 102.0, "round": 2}, DDP: {"error": "no result after 300 s"}},
        {ONE: {"tokens_per_s": 98.0, "round": 3}, DDP: {"tokens_per_s": 184.0, "round": 3}},
    ]
    merged = bench.aggregate_rounds(rounds)
    assert merged[ONE]["round"] == 1 and merged[ONE]["rounds_tokens_per_s"] == [100.0, 102.0, 98.0]
    # two rounds worked: the lower middle one is reported, the failed round is kept as None
    assert merged[DDP]["round"] == 3 and merged[DDP]["rounds_tokens_per_s"] == [190.0, None, 184.0]


def test_rounds_without_a_throughput_keep_the_last_run_that_worked_or_the_error():
    decode, broken = "decode:configs/variants/nf4-sdpa.yaml", "fit:configs/broken.yaml"
    rounds = [
        {decode: {"generate_tokens_per_s": [1.0], "round": 1}, broken: {"error": "first"}},
        {decode: {"error": "timeout"}, broken: {"error": "second"}},
    ]
    merged = bench.aggregate_rounds(rounds)
    assert merged[decode]["round"] == 1
    assert merged[broken] == {"error": "second"}


def test_the_scaling_column_shows_every_rounds_ratio_measured_in_that_round():
    results = bench.aggregate_rounds(
        [
            {ONE: {"tokens_per_s": 100.0}, DDP: {"tokens_per_s": 190.0}},
            {ONE: {"tokens_per_s": 110.0}, DDP: {"tokens_per_s": 198.0}},
            {ONE: {"tokens_per_s": 105.0}, DDP: {"error": "not run: time budget spent"}},
        ]
    )
    row = next(line for line in bench.summary_table(results).splitlines() if line.startswith(f"| {DDP} |"))
    # the median rounds' ratio (190 / 105), then each round's own: 190 / 100 and 198 / 110
    assert "x1.81 of one GPU" in row
    assert "rounds x1.90, x1.80 (min x1.80)" in row
    single = bench.summary_table({ONE: {"tokens_per_s": 100.0}, DDP: {"tokens_per_s": 190.0}})
    assert "x1.90 of one GPU" in single and "rounds" not in single


def test_a_distributed_workload_with_strategy_settings_is_compared_with_the_same_one_gpu_workload():
    timer = " --trainer.callbacks+=benchmarks.step_diagnostics.GpuPhaseTimer"
    variants = [
        DDP + " --trainer.strategy.init_args.nccl_peer_to_peer false",
        DDP + " --trainer.strategy.init_args.process_group_backend gloo" + timer,
        DDP + " --trainer.devices=2 --trainer.strategy.bucket_cap_mb 1000",
    ]
    assert [bench.one_gpu_workload(v) for v in variants] == [ONE, ONE + timer, ONE]
    assert bench.one_gpu_workload(ONE + " --trainer.max_steps 5") == ONE + " --trainer.max_steps 5"
    table = bench.summary_table({ONE: {"tokens_per_s": 100.0}, variants[0]: {"tokens_per_s": 193.0}})
    assert "x1.93 of one GPU" in table


def test_repeats_run_every_workload_in_each_round_on_a_cpu(tmp_path, book_path):
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO_ROOT / "benchmarks/speed_side_by_side.py"), "--out", str(out)]
    command += ["--source", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "2"]
    command += ["--only", "fit:configs/tiny.yaml", "unsloth"]
    environment = {key: value for key, value in os.environ.items() if key != bench.UNSLOTH_SITE_ENV}
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for round_folder in ("round-1", "round-2"):
        (result_file,) = (out / round_folder).glob("*.json")
        assert json.loads(result_file.read_text())["tokens_per_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    rates = summary["results"]["fit:configs/tiny.yaml"]["rounds_tokens_per_s"]
    assert len(rates) == 2 and all(rate > 0 for rate in rates)
    assert len(summary["rounds"]) == 2
    assert "unsloth not installed" in summary["results"]["unsloth"]["skipped"]  # the peer's row, said skipped
    assert "| unsloth | skipped: unsloth not installed" in done.stdout


def test_qlora_recipes_are_set_beside_unsloth_measured_in_the_same_run():
    fast, lean = "fit:configs/finetune/qlora-fast.yaml", "fit:configs/finetune/qlora-lean.yaml"
    offload = "fit:configs/finetune/qlora-offload.yaml"
    results = {
        "unsloth": {"tokens_per_s": 10_000.0, "peak_allocated_gib": 20.0},
        "unsloth:checkpointing": {"tokens_per_s": 8_000.0, "peak_allocated_gib": 5.0},
        fast: {"tokens_per_s": 15_000.0, "peak_allocated_gib": 22.0},
        lean: {"tokens_per_s": 10_400.0, "peak_allocated_gib": 5.5},
        offload: {"tokens_per_s": 8_800.0, "peak_allocated_gib": 4.5},
    }
    rows = {line.split(" |")[0][2:]: line for line in bench.summary_table(results).splitlines()[2:]}
    assert "x1.50 unsloth at x1.10 its memory" in rows[fast]
    assert "x1.30 unsloth:checkpointing at x1.10 its memory" in rows[lean]
    assert "x1.10 unsloth:checkpointing at x0.90 its memory" in rows[offload]
    assert bench.peer_note(fast, results[fast], {}) == ""  # no peer in the run: nothing claimed


def test_repeats_below_one_are_refused():
    command = [sys.executable, str(REPO_ROOT / "benchmarks/speed_side_by_side.py"), "--out", "unused", "--repeats", "0"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--repeats must be at least 1, got 0" in done.stderr
    assert not (REPO_ROOT / "unused").exists()


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_an_interrupted_run_stops_its_workload_and_keeps_the_finished_rounds(tmp_path, book_path):
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO_ROOT / "benchmarks/speed_side_by_side.py"), "--out", str(out)]
    command += ["--source", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "2"]
    command += ["--only", "fit:configs/tiny.yaml"]
    run = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "round-2").glob("*.log")) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # the second round's workload is running
        assert run.poll() is None and _processes_naming(str(out / "round-2"))
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        run.kill()
    time.sleep(1)
    assert not _processes_naming(str(out / "round-2"))  # the workload went with the run
    (first,) = (out / "round-1").glob("*.json")
    assert json.loads(first.read_text())["tokens_per_s"] > 0  # the finished round is intact
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["rounds"][1] == {}
    rates = summary["results"]["fit:configs/tiny.yaml"]["rounds_tokens_per_s"]
    assert len(rates) == 1 and rates[0] > 0


def test_the_phase_timer_reports_the_hosts_time_per_phase_on_a_cpu(capsys):
    """The host's clock at the phase boundaries (a CPU has no CUDA events: only the host line)."""
    import re
    import time
    from types import SimpleNamespace

    from benchmarks.step_diagnostics import GpuPhaseTimer

    timer, trainer = GpuPhaseTimer(skip=2), SimpleNamespace(global_rank=0)
    for batch_idx in range(6):
        timer.on_train_batch_start(trainer, None, None, batch_idx)
        time.sleep(0.02)  # the forward
        timer.on_before_backward(trainer, None, None)
        time.sleep(0.01)  # the backward
        timer.on_after_backward(trainer, None)
        timer.on_before_optimizer_step(trainer, None, None)
        timer.on_train_batch_end(trainer, None, None, None, batch_idx)
    timer.on_train_end(trainer, None)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[host-phase] rank 0 ms/step over 4 steps: ")  # the first 2 batches skipped
    phases = {name: float(value) for name, value in re.findall(r"(\w+) (\d+\.\d)", line)}
    assert 20 <= phases["forward"] < 200 and 10 <= phases["backward"] < 100
    assert phases["forward"] > phases["backward"] > phases["to_optimizer"]


def test_the_phase_timer_splits_the_forward_where_the_decoder_returns_and_dumps_each_step(tmp_path, capsys):
    """With a decoder stack, the forward is timed as layers then loss; every step's boundaries are written."""
    import json
    import re
    import time
    from types import SimpleNamespace

    from benchmarks.step_diagnostics import GpuPhaseTimer

    decoder = torch.nn.Linear(2, 2)
    module = SimpleNamespace(_causal_lm=lambda: SimpleNamespace(model=decoder))
    timer, trainer = GpuPhaseTimer(skip=1, dump_dir=str(tmp_path)), SimpleNamespace(global_rank=1)
    timer.on_train_start(trainer, module)
    for batch_idx in range(4):
        timer.on_train_batch_start(trainer, module, None, batch_idx)
        time.sleep(0.02)  # the layers
        decoder(torch.zeros(1, 2))
        time.sleep(0.01)  # the loss
        timer.on_before_backward(trainer, module, None)
        decoder(torch.zeros(1, 2))  # a recomputation in the backward is not a boundary
        timer.on_after_backward(trainer, module)
        timer.on_before_optimizer_step(trainer, module, None)
        timer.on_train_batch_end(trainer, module, None, None, batch_idx)
    timer.on_train_end(trainer, module)
    decoder(torch.zeros(1, 2))  # the hook is gone after training
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[host-phase] rank 1 ms/step over 3 steps: ")
    phases = {name: float(value) for name, value in re.findall(r"(\w+) (\d+\.\d)", line)}
    assert 20 <= phases["layers"] < 200 and 10 <= phases["loss"] < 100 and "forward" not in phases
    record = json.loads((tmp_path / "phases-rank1.json").read_text())
    assert record["phases"][1:3] == ["layers", "loss"] and record["gpu_phase_ms"] == []
    assert [len(step) for step in record["host_ms"]] == [6, 6, 6]
    assert all(b >= a for step in record["host_ms"] for a, b in itertools.pairwise(step))


def test_the_phase_timer_refuses_a_file_as_its_dump_folder_before_training(tmp_path):
    from benchmarks.step_diagnostics import GpuPhaseTimer
    from foundation import ConfigError

    taken = tmp_path / "notes.txt"
    taken.write_text("kept")
    with pytest.raises(ConfigError, match="dump_dir .*notes.txt is a file; give a folder"):
        GpuPhaseTimer(dump_dir=str(taken))
    assert taken.read_text() == "kept"
    GpuPhaseTimer(dump_dir=str(tmp_path / "new"))  # a missing folder is made when training ends


def test_the_step_profile_puts_each_kernel_in_one_bucket_and_counts_idle_time_once():
    import step_profile

    kernels = [
        ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", 0.0, 100.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 100.0, 600.0),
        ("triton_poi_fused_add_mul_0", 550.0, 650.0),  # overlaps the GEMM by 50 us: counted once as busy
        ("flash_fwd_kernel", 700.0, 800.0),
        ("_liger_cross_entropy_kernel", 800.0, 900.0),
        ("void at::native::multi_tensor_apply_kernel<adam>", 900.0, 950.0),
        ("Memcpy HtoD (Pageable -> Device)", 950.0, 960.0),
    ]
    result = step_profile.breakdown(kernels, step_ms=[1.0])
    ms = result["ms_per_step"]
    assert ms["matrix products"] == 0.5 and ms["nf4 dequantize"] == 0.1 and ms["attention"] == 0.1
    assert ms["loss"] == 0.1 and ms["optimizer"] == 0.05 and ms["elementwise and norms"] == 0.1
    assert ms["copies"] == pytest.approx(0.01)
    assert ms["idle"] == pytest.approx(1.0 - 0.91)  # 700 - 650 and 960 - 1000 us uncovered
    assert next(iter(ms)) == "matrix products"  # largest first
    assert result["heaviest_kernels"][0]["kernel"].startswith("sm90_xmma_gemm")
    assert result["heaviest_kernels"][0]["ms_per_step"] == 0.5
    gap = result["longest_gaps"][0]  # 650 -> 700 us, between the elementwise kernel and attention
    assert gap["ms"] == 0.05 and gap["after"] == "triton_poi_fused_add_mul_0" and gap["before"] == "flash_fwd_kernel"
    assert len(result["longest_gaps"]) == 1  # the GEMM's overlap is no gap
    # names seen in an H100 trace: inductor's norm with a cast, cuDNN's attention helpers, a cast kernel
    assert step_profile.bucket_of("triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_6") == (
        "elementwise and norms"
    )
    assert step_profile.bucket_of("void cudnn::fusion::compute_dot_do_o_specialized<true, 128>") == "attention"
    assert step_profile.bucket_of("void at::native::vectorized_elementwise_kernel<4, direct_copy_kernel_cuda>") == (
        "copies"
    )


def test_the_headline_of_benchmarks_md_is_the_one_its_json_makes():
    """BENCHMARKS.md's first table is made from the runs' JSON (benchmarks/headline.py --write): a JSON file
    changed, added or removed without the table made again fails here."""
    import headline

    current = headline.BENCHMARKS.read_text()
    assert headline.with_headline(current, headline.headline(headline.load_runs())) == current
    for run in headline.load_runs():  # every run says when, at which commit and with which command it ran
        assert {"date", "commit", "command"} <= set(run.get("run", {})), run["folder"]


def test_a_headline_row_takes_only_runs_of_its_own_shape():
    """A 32k-token run of the offload workload must not stand in for its 4 x 1024 row, nor the reverse."""
    import headline

    def run(command: str, tokens_per_s: float) -> dict:
        results = {
            headline.QLORA_OFFLOAD: {"tokens_per_s": tokens_per_s, "input_tokens_per_s": tokens_per_s},
            "unsloth:checkpointing": {"tokens_per_s": 1.0, "input_tokens_per_s": 1.0},
        }
        return {"run": {"command": command, "date": "2026-12-06"}, "results": results, "folder": "f"}

    long = run("python benchmarks/speed_side_by_side.py --block 32768 --batch 1 --only x", 7.0)
    short = run("python benchmarks/speed_side_by_side.py --only x", 5.0)
    assert headline.shape_of(long) == (1, 32768) and headline.shape_of(short) == (4, 1024)
    table = headline.headline([long, short])  # the newest first: the long run would win every row it fits
    rows = [line for line in table.splitlines() if line.startswith("| QLoRA 7B")]
    assert any("32k-token" in line and "| 7 tok/s" in line for line in rows)
    assert any("(offloaded checkpointing), vs unsloth's | 5 tok/s" in line for line in rows)
    assert not any("32k-token" not in line and "| 7 tok/s" in line for line in rows)


def test_every_recipe_in_the_gpu_matrix_recomputes_at_least_one_layer_when_it_checkpoints():
    """qlora-lean keeps its last 4 layers' activations: at the matrix's 4 layers it would recompute none."""
    import re

    import recipe_matrix

    fits = [step for step in recipe_matrix.plan_steps() if step.stage == "fit"]
    assert {step.config for step in fits} >= {"finetune/qlora-lean", "finetune/qlora-offload"}
    for step in fits:
        config = re.search(r"-c (configs/finetune/\S+\.yaml)", step.command).group(1)
        model = recipe_matrix.model_settings(REPO_ROOT / config)
        if model.get("activation_checkpointing", "off") == "off":
            continue
        layers = int(re.search(r"num_hidden_layers: (\d+)", step.command).group(1))
        assert layers > model.get("keep_last_layers", 0), step.name


def test_workloads_that_timed_rows_of_different_padding_are_compared_on_positions():
    """At 16k tokens a row the book's tail row scores 7,756 tokens but costs a full row: ``smarter fit`` timed it
    (shuffled rows), unsloth did not (rows in order). Scored tokens a second said 0.85x; the work, 1.03x."""
    import headline

    ours = {"tokens_per_s": 7273.0, "input_tokens_per_s": 8821.0, "step_time_ms": 1857.4}
    unsloth = {"tokens_per_s": 8576.0, "input_tokens_per_s": 8577.0}
    assert bench.comparable_rates(ours, unsloth) == (8821.0, 8577.0)
    assert bench.comparable_rates(ours, {"tokens_per_s": 8576.0}) == (7273.0, 8576.0)  # an older run: as recorded
    note = bench.peer_note(headline.QLORA_OFFLOAD, ours, {"unsloth:checkpointing": unsloth})
    assert "x1.03 unsloth:checkpointing" in note
    # the headline's long-context speed rows take only runs with both figures
    run = {"run": {"command": "x --block 16384 --batch 1", "date": "2026-12-06"}, "folder": "f"}
    old = {**run, "results": {headline.QLORA_OFFLOAD: ours, "unsloth:checkpointing": {"tokens_per_s": 8576.0}}}
    assert "16k-token sequences (batch 1)" not in headline.headline([old])
    new = {**run, "results": {headline.QLORA_OFFLOAD: ours, "unsloth:checkpointing": unsloth}}
    assert "| 8,821 tok/s | 8,577 tok/s (unsloth:checkpointing) | 1.03x |" in headline.headline([new])


def test_the_timed_loop_counts_scored_tokens_and_positions_apart():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.tensor([[1, 2, bench.IGNORE_INDEX, bench.IGNORE_INDEX]])
    batches = [(torch.zeros(1, 4, dtype=torch.long), labels)] * 3

    def loss_of(ids, labels):
        return model(torch.ones(4)).sum()

    timed = bench.timed_training(model, optimizer, batches, 1, torch.device("cpu"), loss_of)
    assert timed["input_tokens_per_s"] == pytest.approx(2 * timed["tokens_per_s"])
    assert set(timed) == {"tokens_per_s", "input_tokens_per_s", "final_loss"}
