"""Several processes (gloo on a CPU, as DDP runs on GPUs): the data split without overlap, every metric
reduced exactly, checkpoints and predictions written once and whole, and several machines."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from helpers import QUIET, TINY, TRACE, run_smarter, scalars

CPU = ["--trainer.accelerator", "cpu"]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def _val_ppl(folder: Path, *args: str) -> float:
    result = run_smarter(
        "validate", "-c", TINY, *QUIET, *CPU, "--data.block_size", "128", *args, cwd=folder, timeout=600, env=_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (value,) = [v for _, v in scalars(folder / "runs")["val/ppl"]]
    return value


def test_perplexity_under_ddp_equals_single_process(tmp_path, book_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = _val_ppl(tmp_path / "one")
    ddp = _val_ppl(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert ddp == pytest.approx(single, rel=1e-6)


def test_fit_on_two_processes_sees_each_sample_once_writes_one_checkpoint_and_exact_val_ppl(tmp_path, book_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    # the strategy configs/distributed/ddp.yaml picks (static graph, gradients in DDP's buckets)
    fit = ["fit", "-c", TINY, *QUIET, *CPU, "--trainer.devices", "2"]
    fit += ["--trainer.strategy.class_path", "callbacks.strategies.MistralDDPStrategy"]
    fit += ["--trainer.strategy.nccl_peer_to_peer", "false"]
    fit += ["--data.block_size", "256", "--data.batch_size", "4", "--trainer.max_epochs", "1"]
    fit += ["--trainer.val_check_interval", "1.0", "--trainer.log_every_n_steps", "1"]
    fit += ["--trainer.callbacks+=custom_modules.RecordTrainingRows", "--trainer.callbacks.folder", str(rows)]
    fit += ["-c", str(REPO_ROOT / "configs/callbacks/throughput.yaml"), "-c", TRACE]
    result = run_smarter(*fit, cwd=tmp_path, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    # no gradient accumulation: DDP's graph declared static (no per-step search for unused weights)
    assert [(rows / f"static-graph-rank{rank}.txt").read_text() for rank in (0, 1)] == ["True", "True"]
    # NCCL's peer-to-peer transport turned off in every process, before its process group started
    assert [(rows / f"nccl-p2p-disable-rank{rank}.txt").read_text() for rank in (0, 1)] == ["1", "1"]
    seen = [line for rank in (0, 1) for line in (rows / f"rank{rank}.txt").read_text().split()]
    from datamodules.treasure_island import TreasureIslandDataModule

    data = TreasureIslandDataModule(block_size=256)
    data.setup("fit")
    train = data.datasets["train"].tensors["input_ids"]
    every = [hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in train]
    assert sorted(seen) == sorted(every)  # each training block once in the epoch, across both processes
    run = next((tmp_path / "runs" / "tiny").glob("version_*"))
    checkpoints = list((run / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 1 and len(list((run / "export").iterdir())) == 1
    # each process traced its own steps, into its own files (none overwritten by the other)
    traces = sorted(path.name for path in (run / "kernel_trace").glob("*.pt.trace.json.gz"))
    assert traces == ["train-cycle1-rank0.pt.trace.json.gz", "train-cycle1-rank1.pt.trace.json.gz"]
    pids = []
    for name in traces:
        with gzip.open(run / "kernel_trace" / name) as trace:
            events = json.load(trace)["traceEvents"]
        pids.append({event["pid"] for event in events if isinstance(event.get("pid"), int)})
    assert pids[0] and pids[1] and not pids[0] & pids[1], "both files hold the same process's trace"
    logged = scalars(run)
    assert (
        logged["perf/train/tokens_per_s"][-1][1]
        == pytest.approx(2 * logged["perf/train/tokens_per_s_per_device"][-1][1])
        if "perf/train/tokens_per_s" in logged
        else True
    )
    # each process's own step time, the slowest of which is the run's
    per_rank = [logged[f"perf/train/step_time_ms_rank{rank}"][-1][1] for rank in (0, 1)]
    assert max(per_rank) == pytest.approx(logged["perf/train/step_time_ms"][-1][1], rel=1e-6)
    assert all(logged[f"perf/train/between_steps_ms_rank{rank}"][-1][1] >= 0 for rank in (0, 1))
    fit_ppl = logged["val/ppl"][-1][1]  # validated on 2 processes at the end of the epoch
    (tmp_path / "check").mkdir()
    single = _val_ppl(tmp_path / "check", "--data.block_size", "256", "--ckpt_path", str(checkpoints[0]))
    assert single == pytest.approx(fit_ppl, rel=1e-6)
    # the logged loss is the global batch's: process r took blocks r, r + 2, ... of the shuffled order, so
    # one process with batches of 8 sees the same 8 blocks at the first step, before any update
    (tmp_path / "one").mkdir()
    one = ["fit", "-c", TINY, *QUIET, *CPU, "--data.block_size", "256", "--data.batch_size", "8"]
    one += ["--trainer.max_steps", "1", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0"]
    result = run_smarter(*one, cwd=tmp_path / "one", timeout=600, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    (one_run,) = (tmp_path / "one" / "runs" / "tiny").glob("version_*")
    first_single = scalars(one_run)["train/loss"][0]
    assert first_single[0] == logged["train/loss"][0][0] == 0
    assert logged["train/loss"][0][1] == pytest.approx(first_single[1], rel=1e-5)


def test_ddp_accumulating_two_batches_a_step_trains_as_one_process_with_both_processes_batches(tmp_path, book_path):
    """Gradient accumulation under the DDP strategy configs/distributed/ddp.yaml picks: its static graph
    made DDP's reducer fail its first skipped all-reduce with an internal assertion; each optimizer step
    must be the one a single process takes over the same blocks (process r: blocks r, r + 2, ...)."""
    common = ["fit", "-c", TINY, *QUIET, *CPU, "--data.block_size", "256", "--trainer.max_steps", "2"]
    common += ["--trainer.accumulate_grad_batches", "2", "--trainer.log_every_n_steps", "1"]
    common += ["--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2", "--model.warmup_steps", "0"]
    runs = {}
    for name, args in {
        "two": [
            *("--trainer.devices", "2", "--data.batch_size", "2"),
            *("--trainer.strategy.class_path", "callbacks.strategies.MistralDDPStrategy"),
            *("--trainer.callbacks+=custom_modules.RecordTrainingRows", "--trainer.callbacks.folder", str(tmp_path)),
        ],
        "one": ["--data.batch_size", "4"],
    }.items():
        (tmp_path / name).mkdir()
        result = run_smarter(*common, *args, cwd=tmp_path / name, timeout=600, env=_env())
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = scalars(next((tmp_path / name / "runs" / "tiny").glob("version_*")))
    for tag in ("train/loss", "val/ppl"):
        two, one = runs["two"][tag], runs["one"][tag]
        assert [step for step, _ in two] == [step for step, _ in one] and len(one) >= 1, tag
        assert [value for _, value in two] == pytest.approx([value for _, value in one], rel=1e-5), tag
    assert [(tmp_path / f"static-graph-rank{rank}.txt").read_text() for rank in (0, 1)] == ["False", "False"]
    # the second step's loss differs from the first: the first step's update (of both batches) took effect
    assert runs["one"]["train/loss"][0][1] != runs["one"]["train/loss"][-1][1]


def test_predict_on_two_processes_writes_every_prompt_once_in_order(tmp_path, book_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Question number {n}?\n" for n in range(5)))
    args = ["predict", "-c", TINY, *QUIET, *CPU, "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    args += ["--data.prompts_file", str(prompts), "--model.generation.max_new_tokens", "3"]
    result = run_smarter(*args, cwd=tmp_path, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    (predictions,) = (tmp_path / "runs").rglob("predictions.jsonl")
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [f"Question number {n}?" for n in range(5)]
    assert not list(predictions.parent.glob("*.part"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_single_process_nodes_score_the_single_process_perplexity(tmp_path, book_path):
    """Two separate launches, NODE_RANK 0 and 1, as two machines would run them (one process each)."""
    (tmp_path / "one").mkdir()
    single = _val_ppl(tmp_path / "one")
    port = str(_free_port())
    args = ["validate", "-c", TINY, *QUIET, *CPU, "--data.block_size", "128", "--trainer.num_nodes", "2"]
    args += ["--trainer.devices", "1", "--trainer.strategy", "ddp"]
    nodes = []
    for rank in (0, 1):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank), WORLD_SIZE="2")
        nodes.append(
            subprocess.Popen(
                [sys.executable, "-m", "smarter.cli", *args],
                cwd=folder,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr.decode()[-3000:]
    (value,) = [v for _, v in scalars(tmp_path / "node0" / "runs")["val/ppl"]]
    assert value == pytest.approx(single, rel=1e-6)
    assert not (tmp_path / "node1" / "runs").exists()  # only the first machine writes logs


def test_a_strategy_that_cannot_run_is_refused_before_weights_load(tmp_path, monkeypatch, capsys):
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from foundation import ConfigError
    from lightning_modules import ModelSpec
    from lightning_modules.execution_plan import Platform, resolve_plan
    from smarter.cli import main

    bf16 = FSDPPrecision("bf16-true")

    class FSDPOnAGpu(FSDPStrategy):
        @property
        def root_device(self) -> torch.device:
            return torch.device("cuda", 0)

    def check_strategy_fits_quantization(strategy, quantization, quant_storage):
        spec = ModelSpec(source="tiny", quantization=quantization, quant_storage=quant_storage)
        resolve_plan(spec, "fit", Platform.detect(strategy))

    def check_strategy_fits_compile(strategy, compile_mode):
        resolve_plan(ModelSpec(source="tiny", compile=compile_mode), "fit", Platform.detect(strategy))

    with pytest.raises(ConfigError, match="shards floating-point tensors only; set model.quant_storage: bfloat16"):
        check_strategy_fits_quantization(FSDPOnAGpu(precision_plugin=bf16), "nf4", "uint8")
    with pytest.raises(ConfigError, match="cannot shard LLM.int8 weights"):
        check_strategy_fits_quantization(FSDPOnAGpu(precision_plugin=bf16), "int8", "uint8")
    check_strategy_fits_quantization(FSDPOnAGpu(precision_plugin=bf16), "nf4", "bfloat16")  # fsdp-qlora.yaml
    check_strategy_fits_quantization(FSDPOnAGpu(precision_plugin=bf16), "none", "uint8")  # bf16 LoRA
    # Lightning's default 32-true would cast the bf16 model, and the 4-bit weights packed in it, to float32
    with pytest.raises(ConfigError, match="trainer.precision 32-true would cast the model.dtype bfloat16 weights"):
        check_strategy_fits_quantization(FSDPOnAGpu(), "nf4", "bfloat16")
    with pytest.raises(ConfigError, match="set trainer.precision: bf16-true"):
        check_strategy_fits_quantization(FSDPOnAGpu(), "none", "uint8")
    with pytest.raises(ConfigError, match="set model.quant_storage: bfloat16"):
        check_strategy_fits_quantization(FSDPOnAGpu(precision_plugin=bf16), "nf4", "float16")

    with pytest.raises(ConfigError, match="layers-cudagraphs cannot run under FSDPOnAGpu"):
        check_strategy_fits_compile(FSDPOnAGpu(precision_plugin=bf16), "layers-cudagraphs")
    check_strategy_fits_compile(FSDPOnAGpu(precision_plugin=bf16), "layers")
    check_strategy_fits_compile(DDPStrategy(parallel_devices=[torch.device("cuda", 0)]), "layers-cudagraphs")

    monkeypatch.chdir(tmp_path)
    fsdp = str(REPO_ROOT / "configs/distributed/fsdp-qlora.yaml")
    args = ["fit", "-c", str(REPO_ROOT / "configs/finetune/qlora.yaml"), "-c", fsdp, "--model.source", "tiny"]
    with pytest.raises(SystemExit) as refused:
        main([*args, *CPU, "--trainer.devices", "1"])
    assert refused.value.code == 2
    assert "MistralFSDPStrategy runs on GPUs only; use trainer.strategy ddp on CPUs." in capsys.readouterr().err
    with pytest.raises(SystemExit) as too_many:
        main(["validate", "-c", TINY, "--trainer.accelerator", "gpu", "--trainer.devices", "64"])
    assert too_many.value.code == 2
    refusal = "the trainer settings cannot run here" if torch.cuda.is_available() else "needs a CUDA GPU and none"
    assert refusal in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_fsdp_wrap_policy_keeps_frozen_and_trainable_weights_in_separate_units():
    from callbacks.strategies import decoder_layers_and_trainable_leaves
    from lightning_modules import LoraSettings, MistralModule

    module = MistralModule(source="tiny", dtype="bfloat16", lora=LoraSettings(r=4, alpha=8))
    module.configure_model()
    units = [m for m in module.model.modules() if decoder_layers_and_trainable_leaves(m, False, 0)]
    layers = module.model_config.num_hidden_layers
    decoder_units = [m for m in units if type(m).__name__ == "MistralDecoderLayer"]
    adapter_units = [m for m in units if m not in decoder_units]
    assert len(decoder_units) == layers
    assert len(adapter_units) == layers * 7 * 2  # lora_A and lora_B of seven projections
    for unit in adapter_units:  # an adapter unit's weights all train
        assert all(p.requires_grad for p in unit.parameters())
    owned = {id(p) for unit in adapter_units for p in unit.parameters()}
    for layer in decoder_units:  # what a layer's own unit keeps (its adapters split off) is all frozen
        assert not any(p.requires_grad for p in layer.parameters() if id(p) not in owned)
    assert all(decoder_layers_and_trainable_leaves(m, True, 0) for m in module.model.modules())


def test_the_fsdp_and_ddp_configs_build_strategies_with_this_frameworks_settings():
    """Through the CLI, as a user runs them: LightningCLI passes FSDPStrategy's every parameter, unset ones as
    None, which once dropped the wrap policy (the whole 7B became one FSDP unit: 13.9 GiB a GPU, not 6.3)."""
    from callbacks.strategies import MistralDDPStrategy, MistralFSDPStrategy, decoder_layers_and_trainable_leaves
    from smarter.lightning_cli import build_cli

    configs = REPO_ROOT / "configs" / "distributed"
    common = ["-c", TINY, *QUIET, "--trainer.logger=false", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    fsdp = build_cli([*common[:2], "-c", str(configs / "fsdp-qlora.yaml"), *common[2:]], run=False).trainer.strategy
    assert isinstance(fsdp, MistralFSDPStrategy)
    assert fsdp.kwargs["auto_wrap_policy"] is decoder_layers_and_trainable_leaves
    assert fsdp.kwargs["use_orig_params"] is True
    ddp = build_cli([*common[:2], "-c", str(configs / "ddp.yaml"), *common[2:]], run=False).trainer.strategy
    assert isinstance(ddp, MistralDDPStrategy)
    settings = ddp._ddp_kwargs
    assert settings["gradient_as_bucket_view"] is True
    # the graph is declared static when DDP is built, unless the run accumulates gradients
    assert ddp.static_graph_setting is None and "static_graph" not in settings
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    from callbacks.strategies import accumulates_gradients

    assert not accumulates_gradients(SimpleNamespace(accumulate_grad_batches=1, callbacks=[]))
    assert accumulates_gradients(SimpleNamespace(accumulate_grad_batches=2, callbacks=[]))
    scheduled = SimpleNamespace(accumulate_grad_batches=1, callbacks=[GradientAccumulationScheduler({1: 2})])
    assert accumulates_gradients(scheduled)
    assert False in (settings.get("forward_sync_buffers"), settings.get("broadcast_buffers"))
    assert None not in settings.values()
    assert ddp._ddp_comm_hook is None  # float32 all-reduce unless asked for bfloat16
    assert MistralDDPStrategy(gradient_reduce_dtype="bfloat16")._ddp_comm_hook.__name__ == "bf16_compress_hook"
    assert ddp.nccl_peer_to_peer is False  # the config's choice for adapter-sized gradients
    assert MistralDDPStrategy().nccl_peer_to_peer is True  # NCCL's own default otherwise


def test_nccl_peer_to_peer_off_is_set_before_the_process_group_starts_and_on_leaves_the_environment(monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy

    from callbacks.strategies import MistralDDPStrategy
    from foundation import ConfigError

    seen = []
    monkeypatch.setattr(DDPStrategy, "setup_environment", lambda self: seen.append(os.environ.get("NCCL_P2P_DISABLE")))
    monkeypatch.delenv("NCCL_P2P_DISABLE", raising=False)
    MistralDDPStrategy().setup_environment()
    MistralDDPStrategy(nccl_peer_to_peer=False).setup_environment()
    assert seen == [None, "1"]
    with pytest.raises(ConfigError, match="nccl_peer_to_peer must be true or false, got 'no'"):
        MistralDDPStrategy(nccl_peer_to_peer="no")


def test_a_signal_to_one_process_stops_both_at_the_same_step_with_one_checkpoint(tmp_path, book_path):
    """Only the second process gets SIGTERM after step 3; the flags travel over a CPU group, read a step
    later, so both stop after step 4 together, and the first writes the one checkpoint."""
    fit = ["fit", "-c", TINY, *QUIET, *CPU, "--trainer.devices", "2", "--data.block_size", "128"]
    fit += ["--trainer.strategy.class_path", "callbacks.strategies.MistralDDPStrategy", "--trainer.max_steps", "20"]
    fit += ["--trainer.callbacks+=custom_modules.SignalAtStep", "--trainer.callbacks.step", "3"]
    fit += ["--trainer.callbacks.rank", "1"]
    result = run_smarter(*fit, cwd=tmp_path, timeout=600, env=_env())
    assert result.returncode == 128 + 15, result.stderr[-3000:]
    run = next((tmp_path / "runs" / "tiny").glob("version_*"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["interrupted-step4.ckpt"]
    assert result.stderr.count("smarter: stopped: SIGTERM received: stopped after step 4; checkpoint written to") == 1
    assert not (run / "export").exists()


def test_a_signal_to_one_process_in_predict_stops_both_and_merges_what_they_wrote(tmp_path, book_path):
    """The second process gets SIGTERM after its second batch; both stop a batch later, and the first merges
    every finished prompt of both into the one predictions file, in prompt order, with no part left."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Question number {n}?\n" for n in range(12)))
    args = ["predict", "-c", TINY, *QUIET, *CPU, "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    args += ["--data.prompts_file", str(prompts), "--model.generation.max_new_tokens", "3"]
    args += ["--trainer.callbacks+=custom_modules.SignalAtStep", "--trainer.callbacks.predict_batch", "1"]
    args += ["--trainer.callbacks.rank", "1"]
    result = run_smarter(*args, cwd=tmp_path, timeout=600, env=_env())
    assert result.returncode == 128 + 15, result.stderr[-3000:]
    (predictions,) = (tmp_path / "runs").rglob("predictions.jsonl")
    said = "predict stopped after the current batch; the predictions so far are in"
    assert result.stderr.count(said) == 1 and str(predictions.relative_to(tmp_path)) in result.stderr
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    indices = [r["index"] for r in records]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    assert 4 <= len(records) < 12  # both processes' batches up to the stop, not all twelve prompts
    assert all(r["prompt"] == f"Question number {r['index']}?" for r in records)
    assert not list(predictions.parent.glob("*.part"))


def test_a_signal_to_one_process_in_validate_stops_both_after_the_same_batch(tmp_path, book_path):
    """Before, the process that got the signal stopped alone and the other failed at the metric's all-reduce
    with a traceback; now both stop a batch later, with one line."""
    args = ["validate", "-c", TINY, *QUIET, *CPU, "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    args += ["--data.block_size", "128", "--trainer.callbacks+=custom_modules.SignalAtStep"]
    args += ["--trainer.callbacks.validate_batch", "1", "--trainer.callbacks.rank", "1"]
    result = run_smarter(*args, cwd=tmp_path, timeout=600, env=_env())
    assert result.returncode == 128 + 15, result.stderr[-3000:]
    assert result.stderr.count("smarter: stopped: SIGTERM received: validate stopped after the current batch") == 1
    assert "Traceback" not in result.stderr


def test_layers_compiled_inside_ddp_are_the_graphs_one_process_compiles(monkeypatch):
    """Dynamo's DDP optimizer cuts any graph compiled inside DDP's forward where DDP's buckets end (the
    first holds 1 MB): a decoder layer with more trainable weight than that compiled as two graphs under DDP
    and one without. ``compile_layers`` keeps each layer whole where the plan says so (under DDP), with the
    process's own dynamo settings untouched. Counted with a backend that records each graph
    (CPU, one gloo process); the layers' LoRA here holds 1.2 MB, as a 7B layer's holds 5.2 MB."""
    import torch._dynamo
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lightning_modules.fast_paths import compile_layers
    from lightning_modules.mistral_module import MistralModule
    from lightning_modules.model_building import LoraSettings

    graphs: list[int] = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(len(graph_module.graph.nodes))
        return graph_module.forward

    real_compile = torch.compile

    def compile_counting(fn, dynamic=None, mode=None):
        return real_compile(fn, backend=counting_backend)

    monkeypatch.setattr(torch, "compile", compile_counting)
    assert torch._dynamo.config.optimize_ddp is True  # torch's default: the cut is on unless a layer says otherwise

    def graphs_of_one_step(under_ddp: bool, whole: bool = True) -> list[int]:
        torch._dynamo.reset()
        graphs.clear()
        module = MistralModule(source="tiny", dtype="float32", lora=LoraSettings(r=128, alpha=256))
        module.configure_model()
        trainable = sum(p.numel() * p.element_size() for p in module.model.parameters() if p.requires_grad)
        assert trainable / 2 > 2**20  # each of the 2 layers: more than DDP's first bucket
        compile_layers(module.model, cuda_graphs=True, whole_under_ddp=whole)
        model = DistributedDataParallel(module.model) if under_ddp else module.model
        model(input_ids=torch.randint(0, 100, (1, 8))).logits.sum().backward()
        return list(graphs)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        alone = graphs_of_one_step(under_ddp=False)
        under_ddp = graphs_of_one_step(under_ddp=True)
        split = graphs_of_one_step(under_ddp=True, whole=False)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    assert under_ddp == alone
    assert torch._dynamo.config.optimize_ddp is True  # switched off only around the layers' calls
    assert len(split) > len(alone)  # what the DDP optimizer did: the same layers, cut into more graphs
