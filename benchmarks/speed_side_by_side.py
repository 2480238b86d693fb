"""Benchmark: the plain transformers + peft way against this framework's fit, validate and predict, side by side.

Every workload runs in a fresh process (clean memory figures) on the same GPU, the same Mistral-7B-shape
weights and the same Treasure Island blocks; the baseline is measured in the same run. Printed last:
each figure with its ratio to its baseline and its fraction of the ceiling. JSON: one file per workload.

    python benchmarks/speed_side_by_side.py --out results/                   # every workload
    python benchmarks/speed_side_by_side.py --out results/ --only plain-qlora qlora-fast
    python benchmarks/speed_side_by_side.py --out results/ --source tiny --steps 3   # CPU smoke run
    python benchmarks/speed_side_by_side.py --out results/ --repeats 3 --only \
        fit:configs/finetune/qlora-fast.yaml "fit:configs/finetune/qlora-fast.yaml -c configs/distributed/ddp.yaml"
        # three rounds of one GPU then DDP: the median of each, and DDP's ratio to one GPU in every round

Workloads:
- ``plain-qlora``: from_pretrained with BitsAndBytesConfig (nf4, bf16 compute), prepare_model_for_kbit_training
  (gradient checkpointing on), peft LoRA r16 on all seven projections, AdamW, a hand-written loop;
- ``plain-lora-bf16``: the same on bf16 weights (gradient checkpointing on); either with ``:dropout=0``
  for LoRA dropout 0 instead of 0.05;
- ``fit:<config>``: ``smarter fit`` with that config (e.g. ``fit:configs/finetune/qlora-fast.yaml``);
- ``validate:<config>``: ``smarter validate`` (every token scored: stride = block);
- ``decode:<config>``: batch-1 greedy decode of 4 prompts, 128 new tokens each, with transformers'
  ``generate`` and with the framework's decoder (every prompt timed, the first included);
- ``unsloth`` / ``unsloth:checkpointing``: the peer, unsloth's ``FastLanguageModel`` (nf4 on load, the same
  LoRA r16 on all seven projections, dropout 0, AdamW), without checkpointing or with its offloaded
  checkpointing (``use_gradient_checkpointing="unsloth"``), on the same weights and the same tokens. It runs
  in its own process with ``$UNSLOTH_SITE`` (a folder the unsloth kit is installed in) first on its path,
  apart from this project's packages; without the package the row says it was skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from foundation import GIB, IGNORE_INDEX, synchronize  # noqa: E402

BATCH, BLOCK = 4, 1024
DEFAULT_WORKLOADS = [
    "plain-qlora",
    "plain-qlora:dropout=0",  # like for like with the presets that drop LoRA dropout
    "fit:configs/finetune/qlora.yaml",
    "fit:configs/finetune/qlora-fast.yaml",
    "fit:configs/finetune/qlora-lean.yaml",
    "fit:configs/finetune/qlora-offload.yaml",
    "plain-lora-bf16",
    "fit:configs/finetune/lora-bf16-fast.yaml",
    "validate:configs/variants/bf16-sdpa.yaml",
    "validate:configs/variants/nf4-sdpa.yaml",
    "decode:configs/variants/bf16-sdpa.yaml --model.kernels off",
    "decode:configs/variants/nf4-sdpa.yaml --model.kernels off",
    "fit:configs/finetune/qlora-lean.yaml -c configs/distributed/ddp.yaml",
    "fit:configs/finetune/qlora-lean.yaml -c configs/distributed/fsdp-qlora.yaml",
    "qlora-export",
]
# Ceilings on one H200: 4 x params FLOPs per trained token (LoRA: forward, backward through the frozen
# weights, recomputation not counted) and 2 x params per evaluated token, at the bf16 matmul rate measured
# on this machine; decode reads every weight once per token.
H200_MATMUL_TFLOPS = 783.0
H200_COPY_TBPS = 4.3


def _training_blocks(source: str, steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of packed Treasure Island training blocks, the same for every workload."""
    from datamodules.treasure_island import TreasureIslandDataModule

    data = TreasureIslandDataModule(block_size=BLOCK if source != "tiny" else 64, batch_size=BATCH)
    data.model_requirements = None  # the presets' tokenizer is the Mistral v1 one, the data module's default
    data.prepare_data()
    data.setup("fit")
    rows = data.datasets["train"].tensors
    count = rows["input_ids"].shape[0]
    batches = []
    for index in range(steps):  # the split's rows in order, from its start again when they run out (long blocks)
        pick = torch.arange(index * BATCH, (index + 1) * BATCH) % count
        batches.append({"input_ids": rows["input_ids"][pick], "labels": rows["labels"][pick]})
    return batches


def _preset_folder(source: str, device: torch.device) -> str:
    from lightning_modules.model_building import ModelSpec, prepare_preset_weights

    folder = prepare_preset_weights(ModelSpec(source=source), device)
    return str(folder) if folder is not None else source


def plain_lora(source: str, quantized: bool, steps: int, warmup: int, dropout: float = 0.05) -> dict:
    """The plain way, as a notebook does it: no framework code in the timed loop."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = _preset_folder(source, device)
    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        if quantized
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="sdpa", quantization_config=quant, device_map={"": device}
    )
    if quantized:
        model = prepare_model_for_kbit_training(model)  # casts the rest to fp32, turns checkpointing on
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batches = [(b["input_ids"].to(device), b["labels"].to(device)) for b in _training_blocks(source, warmup + steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def loss_of(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # bf16 autocast, as transformers' Trainer runs with bf16=True: prepare_model_for_kbit_training left
        # the norms and the LM head in fp32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
        )

    timed = timed_training(model, optimizer, batches, warmup, device, loss_of)
    return {
        **timed,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        "timed_steps": steps,
    }


def timed_training(model, optimizer, batches, warmup: int, device: torch.device, loss_of) -> dict[str, float]:
    """Train on ``batches`` (``(input_ids, labels)`` on ``device``), each step synchronized and timed after the first
    ``warmup``; ``loss_of(input_ids, labels)`` is a step's loss, and each label other than ``IGNORE_INDEX`` a scored
    token. Returns scored tokens per second, positions computed per second (a padded row costs its full length)
    and the last loss."""
    timed_tokens, timed_positions, timed_s = 0, 0, 0.0
    model.train()
    for index, (ids, labels) in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        loss = loss_of(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if index >= warmup:
            timed_s += time.perf_counter() - start
            timed_tokens += int((labels != IGNORE_INDEX).sum())
            timed_positions += ids.numel()
    return {
        "tokens_per_s": timed_tokens / timed_s,
        "input_tokens_per_s": timed_positions / timed_s,
        "final_loss": float(loss.detach()),
    }


UNSLOTH_SITE_ENV = "UNSLOTH_SITE"


def unsloth_scratch() -> Path:
    """Where unsloth's inputs and compiled code go: out of the results folder, which keeps only results."""
    return Path(tempfile.gettempdir()) / "smarter-bench-unsloth"


def unsloth_paths(source: str, steps: int) -> tuple[Path, Path]:
    """The folder unsloth loads the model from and the file of training batches, in ``unsloth_scratch()``."""
    scratch = unsloth_scratch()
    return scratch / f"unsloth-model-{source}", scratch / f"training-blocks-{source}-{steps}x{BATCH}x{BLOCK}.pt"


def unsloth_inputs(source: str, steps: int) -> tuple[Path, Path]:
    """A folder with the preset's weights and an HF tokenizer (unsloth loads both from it), and the training
    batches as a file: unsloth's process has none of this project's packages to make them."""
    from lightning_modules.tokenizers import load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = Path(_preset_folder(source, device))
    folder, blocks = unsloth_paths(source, steps)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for file in weights.iterdir():
            (folder / file.name).symlink_to(file.resolve())
        load_tokenizer().save(folder)
    if not blocks.is_file():
        torch.save(_training_blocks(source, steps), blocks)
    return folder, blocks


def unsloth_lora(folder: str, blocks_file: str, steps: int, warmup: int, checkpointing: bool) -> dict:
    """unsloth's way: ``FastLanguageModel`` in 4-bit with its LoRA and its fused loss (labels given to the model),
    the same AdamW; bf16 autocast as its trainer runs with ``bf16=True``."""
    try:
        import unsloth  # noqa: F401  (first: it patches transformers and peft)
        from unsloth import FastLanguageModel
    except ImportError as error:
        return {"skipped": f"unsloth is not importable here ({error}); set ${UNSLOTH_SITE_ENV} to its kit's folder"}
    device = torch.device("cuda")
    model, _ = FastLanguageModel.from_pretrained(
        model_name=folder,
        max_seq_length=max(BLOCK, 2048),
        dtype=torch.bfloat16,
        load_in_4bit=True,
        local_files_only=True,
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        use_gradient_checkpointing="unsloth" if checkpointing else False,
        random_state=0,
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=2e-4)
    batches = []
    for batch in torch.load(blocks_file)[: warmup + steps]:
        # the model shifts labels itself: position t + 1 of its labels is this block's target at t (the
        # block's last target, one of 1024, has no position to go to and is left out of the count)
        shifted = batch["labels"].to(device)
        unshifted = torch.cat([torch.full_like(shifted[:, :1], IGNORE_INDEX), shifted[:, :-1]], dim=1)
        batches.append((batch["input_ids"].to(device), unshifted))
    torch.cuda.reset_peak_memory_stats(device)

    def loss_of(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=labels).loss

    timed = timed_training(model, optimizer, batches, warmup, device, loss_of)
    import importlib.metadata as metadata

    return {
        **timed,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "timed_steps": steps,
        # what its optimizer holds, to set beside the recipes' float32 adapters
        "trained_parameters": sum(p.numel() for p in trained),
        "trained_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trained}),
        "unsloth": metadata.version("unsloth"),
    }


def smarter_run(
    kind: str, config: str, source: str, steps: int, warmup: int, extra: list[str], trace_dir: Path | None = None
) -> dict:
    """``smarter fit`` / ``validate`` through the framework's own CLI objects, timed by its throughput callback.

    ``extra`` may add config files (``-c configs/distributed/ddp.yaml``, ``-c configs/callbacks/kernel_trace.yaml``)
    and options; a kernel trace then writes its summary under ``trace_dir``.
    """
    from callbacks import KernelTraceCallback, ThroughputMemoryCallback
    from smarter.lightning_cli import build_cli, quiet_known_warnings

    quiet_known_warnings()
    scratch = tempfile.mkdtemp()  # the recipe's own logger and checkpoints, out of the way
    args = ["-c", str(REPO / config), "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    args += ["--trainer.default_root_dir", scratch, "--trainer.logger.init_args.save_dir", scratch]
    args += ["--model.source", source, "--data.eval_stride", str(BLOCK if source != "tiny" else 64)]
    if source != "tiny":  # the shapes every workload of this run trains on
        args += ["--data.block_size", str(BLOCK), "--data.batch_size", str(BATCH)]
    if kind == "validate":  # chapters 13-32 held out: enough batches to time
        args += ["--data.val_chapters", "[" + ",".join(str(n) for n in range(13, 33)) + "]"]
    if source == "tiny":  # a CPU smoke run
        args += ["--data.block_size", "64"]
    args += extra
    if kind == "fit":
        # as many steps on any number of GPUs: the recipe's epoch count would end a 2-GPU run at half the steps
        args += ["--trainer.max_steps", str(warmup + steps), "--trainer.max_epochs", "-1"]
        args += ["--trainer.limit_val_batches", "0"]
    else:
        args += ["--trainer.limit_val_batches", str(warmup + steps)]
    cli = build_cli(args, run=False)
    for callback in cli.trainer.callbacks:
        if isinstance(callback, KernelTraceCallback) and trace_dir is not None:
            callback.output_dir = str(trace_dir)
    meter = ThroughputMemoryCallback(warmup_steps=warmup, log_every_n_steps=10_000)
    cli.trainer.callbacks.append(meter)
    start = time.perf_counter()
    if kind == "fit":
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        stage = "train"
    else:
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        stage = "val"
    result = dict(meter.summary[stage])
    result["wall_s"] = time.perf_counter() - start
    result["spec"] = cli.model.spec.describe()
    result["devices"] = cli.trainer.world_size
    if kind == "validate":
        result["val_ppl"] = float(cli.trainer.callback_metrics["val/ppl"])
    return result


def decode_run(config: str, source: str, new_tokens: int, extra: list[str]) -> dict:
    """Batch-1 greedy decode of the default prompts: transformers' generate, then the framework's decoder."""
    from lightning_modules.execution_plan import Platform, resolve_decoding
    from lightning_modules.generation import GenerationSettings, StaticCacheDecoder, generate_timed
    from lightning_modules.measurement import timed_hf_generate
    from smarter.lightning_cli import HEADLESS_TRAINER_ARGS, build_cli, quiet_known_warnings

    quiet_known_warnings()
    cli = build_cli(["-c", str(REPO / config), *HEADLESS_TRAINER_ARGS, "--model.source", source, *extra], run=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = cli.model.build_model(device).eval()
    prompts = [item["input_ids"][None].to(device) for item in cli.datamodule.prompt_items()]
    eos = cli.model.tokenizer.eos_id

    def hf(prompt):
        seconds, tokens = timed_hf_generate(model, prompt, new_tokens, eos)
        return new_tokens / seconds, tokens

    hf_rates, hf_tokens = zip(*[hf(p) for p in prompts], strict=True)
    settings = GenerationSettings(max_new_tokens=new_tokens)
    decoder_kind, matvec = resolve_decoding(
        "static-compiled" if device.type == "cuda" else "static", cli.model.generation.matvec, Platform.detect(device)
    )
    longest = max(p.shape[1] for p in prompts) + new_tokens
    synchronize(device)
    start = time.perf_counter()
    decoder = StaticCacheDecoder(
        model,
        max_cache_len=-(-longest // 128) * 128,
        compiled=decoder_kind == "static-compiled",
        triton_matvec=matvec == "triton",
    )
    for _ in range(2):  # warm-up on the real shapes: the longest prompt (compiles the step)
        generate_timed(model, max(prompts, key=lambda p: p.shape[1]), settings, static_decoder=decoder)
    synchronize(device)
    compile_s = time.perf_counter() - start
    runs = [generate_timed(model, p, settings, static_decoder=decoder) for p in prompts]
    return {
        "hf_generate_tokens_per_s": list(hf_rates),
        "decode_tokens_per_s": [r.decode_tokens_per_s for r in runs],
        "generate_tokens_per_s": [new_tokens / r.total_s for r in runs],
        "ttft_ms": [1000 * r.ttft_s for r in runs],
        "compile_s": compile_s,
        "decoder": decoder_kind,
        "matvec": matvec,
        "same_greedy_tokens_as_generate": [r.new_tokens == list(h) for r, h in zip(runs, hf_tokens, strict=True)],
        "weights_gib": model.get_memory_footprint() / GIB,
    }


def qlora_export_check(source: str, steps: int) -> dict:
    """A short QLoRA fit with a checkpoint; its adapter export loaded onto the nf4 base with plain peft
    must give the fine-tuned model's validation perplexity."""
    import lightning as L
    from peft import PeftModel

    from lightning_modules import load_causal_lm
    from lightning_modules.export import export_trained_model
    from smarter.lightning_cli import build_cli, quiet_known_warnings

    quiet_known_warnings()
    scratch = Path(tempfile.mkdtemp())
    # layers not compiled: the reloaded model then runs the very kernels the trained one ran, so the two
    # perplexities differ only by what the export and reload change
    args = ["-c", str(REPO / "configs/finetune/qlora-lean.yaml"), "--model.source", source, "--model.compile", "off"]
    args += ["--trainer.logger.init_args.save_dir", str(scratch), "--trainer.default_root_dir", str(scratch)]
    args += [
        "--trainer.max_steps",
        str(steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar=false",
    ]
    cli = build_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = scratch / "checkpoint.ckpt"
    cli.trainer.save_checkpoint(checkpoint)

    on_gpu = torch.cuda.is_available()

    def val_ppl(module) -> float:
        trainer = L.Trainer(
            accelerator="gpu" if on_gpu else "cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            limit_val_batches=8,
        )
        trainer.validate(module, datamodule=cli.datamodule, verbose=False)
        return float(trainer.callback_metrics["val/ppl"])

    trained_ppl = val_ppl(cli.model)
    (adapter,) = export_trained_model(cli.model.model, cli.model.spec, scratch / "export")
    base_spec = dataclasses.replace(cli.model.spec, lora=None, compile="off", activation_checkpointing="off")
    settings = {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}  # LightningCLI's own keys out

    def on_a_fresh_nf4_base(wrap=lambda base: base):
        module = type(cli.model)(**{**settings, "lora": None})
        module.model = wrap(load_causal_lm(base_spec, "cuda" if on_gpu else "cpu")).eval()
        return module

    reloaded = on_a_fresh_nf4_base(lambda base: PeftModel.from_pretrained(base, str(adapter)))
    bare = on_a_fresh_nf4_base()  # the same base, no adapter
    return {
        "checkpoint_mb": checkpoint.stat().st_size / 1e6,
        "adapter_mb": sum(f.stat().st_size for f in adapter.iterdir()) / 1e6,
        "fine_tuned_val_ppl": trained_ppl,
        "adapter_on_nf4_base_val_ppl": val_ppl(reloaded),
        "nf4_base_alone_val_ppl": val_ppl(bare),
        "adapter_config": json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"],
    }


def run_workload(name: str, args: argparse.Namespace) -> dict:
    if name.startswith("unsloth"):
        folder, blocks = unsloth_paths(args.source, args.warmup + args.steps)
        return unsloth_lora(str(folder), str(blocks), args.steps, args.warmup, name == "unsloth:checkpointing")
    if name == "qlora-export":
        return qlora_export_check(args.source, args.steps)
    if name.startswith(("plain-qlora", "plain-lora-bf16")):  # plain-qlora, or plain-qlora:dropout=0
        base, _, option = name.partition(":")
        dropout = float(option.removeprefix("dropout=")) if option else 0.05
        quantized = base == "plain-qlora"
        return plain_lora(args.source, quantized=quantized, steps=args.steps, warmup=args.warmup, dropout=dropout)
    kind, _, rest = name.partition(":")
    config, *extra = rest.split()
    if kind in ("fit", "validate"):
        trace_dir = Path(args.out) / ("trace-" + _file_name(name)[: -len(".json")])
        return smarter_run(kind, config, args.source, args.steps, args.warmup, extra, trace_dir)
    if kind == "decode":
        return decode_run(config, args.source, args.new_tokens, extra)
    raise SystemExit(f"unknown workload {name!r}")


def _file_name(workload: str) -> str:
    """A file name for a workload's JSON: readable, and distinct for workloads whose readable part is the
    same (a long spec is cut, so two that differ only near the end would share one file)."""
    readable = "".join(c if c.isalnum() or c in "-." else "_" for c in workload)[:100]
    return f"{readable}-{hashlib.sha1(workload.encode()).hexdigest()[:8]}.json"


def aggregate_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """One result per workload from several rounds of the same workloads: the round with the median
    tokens/s (the lower middle one for an even count), with every round's figure in ``rounds_tokens_per_s``
    (None for a round where it failed or did not run). A workload that never ran keeps its last error."""
    merged: dict[str, dict] = {}
    for name in rounds[0]:
        runs = [r.get(name, {"error": "not run"}) for r in rounds]
        rates = [run.get("tokens_per_s") if "error" not in run else None for run in runs]
        done = sorted((rate, i) for i, rate in enumerate(rates) if rate is not None)
        if not done:  # no tokens/s figure (decode) or no success: the last run that worked, else the last
            merged[name] = dict(next((run for run in reversed(runs) if "error" not in run), runs[-1]))
            continue
        merged[name] = {**runs[done[(len(done) - 1) // 2][1]], "rounds_tokens_per_s": rates}
    return merged


def one_gpu_workload(name: str) -> str:
    """The one-GPU workload a distributed one is compared with: its spec without the distributed config and
    without settings of the strategy, the devices or the machines (``--trainer.strategy.init_args.x y``)."""
    name = re.sub(r"\s+-c\s+configs/distributed/\S+", "", name)
    return re.sub(r"\s+--trainer\.(?:strategy|devices|num_nodes)(?:\.\S+?)?(?:=\S+|\s+(?!--)\S+)", "", name)


def scaling_note(result: dict, one_gpu: dict) -> str:
    """Several GPUs against one: the ratio of the reported figures, and with several rounds each round's
    ratio (both measured in the same round) and their range."""
    note = f"x{result['tokens_per_s'] / one_gpu['tokens_per_s']:.2f} of one GPU"
    wall, wall_one = result.get("wall_tokens_per_s"), one_gpu.get("wall_tokens_per_s")
    if wall and wall_one:
        note += f" (wall x{wall / wall_one:.2f})"
    many_rounds, one_rounds = result.get("rounds_tokens_per_s") or [], one_gpu.get("rounds_tokens_per_s") or []
    if len(many_rounds) != len(one_rounds):  # not from the same rounds: no pairing
        many_rounds = one_rounds = []
    ratios = [many / one for many, one in zip(many_rounds, one_rounds, strict=True) if many and one]
    if len(ratios) > 1:
        note += f"; rounds {', '.join(f'x{r:.2f}' for r in ratios)} (min x{min(ratios):.2f})"
    return note


def run_info() -> dict:
    """When, at which commit and with which command this run ran (``$SMARTER_COMMIT`` names the commit where the
    copy of the repository has no git history of its own)."""
    import datetime
    import shlex

    commit = os.environ.get("SMARTER_COMMIT")
    if not commit:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        commit = found.stdout.strip() if found.returncode == 0 else "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": shlex.join(["python", "benchmarks/speed_side_by_side.py", *sys.argv[1:]]),
    }


def versions() -> dict:
    import importlib.metadata as metadata

    found = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for package in ("transformers", "peft", "bitsandbytes", "lightning", "liger_kernel"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return found


def summary_table(results: dict[str, dict]) -> str:
    """Each figure beside its baseline from the same run, with the ratio and the fraction of the ceiling."""
    params = 7.2417e9
    train_ceiling = H200_MATMUL_TFLOPS * 1e12 / (4 * params)
    eval_ceiling = H200_MATMUL_TFLOPS * 1e12 / (2 * params)
    rows = [
        "| workload | tokens/s | wall tokens/s | peak GiB | vs baseline | of ceiling |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    baselines = {"qlora": results.get("plain-qlora", {}), "bf16": results.get("plain-lora-bf16", {})}
    if "plain-qlora:dropout=0" in results:  # a like-for-like second ratio for recipes without dropout
        baselines["qlora-no-dropout"] = results["plain-qlora:dropout=0"]
    for name, result in results.items():
        if "error" in result:
            rows.append(f"| {name} | failed: {result['error'][:80]} | | | | |")
            continue
        if "skipped" in result:
            rows.append(f"| {name} | skipped: {result['skipped'][:80]} | | | | |")
            continue
        if name.startswith("decode:"):
            ours, hf = result["generate_tokens_per_s"], result["hf_generate_tokens_per_s"]
            ceiling = H200_COPY_TBPS * 1e12 / (result["weights_gib"] * GIB)
            rows.append(
                f"| {name} (each prompt) | {', '.join(f'{x:.0f}' for x in ours)} | | | "
                f"HF generate {', '.join(f'{x:.0f}' for x in hf)} (x{min(ours) / max(hf):.2f} worst vs best) | "
                f"{min(ours) / ceiling:.0%} (compile {result['compile_s']:.0f} s) |"
            )
            continue
        if name == "qlora-export":
            rows.append(
                f"| {name} | checkpoint {result['checkpoint_mb']:.1f} MB | | | val ppl fine-tuned "
                f"{result['fine_tuned_val_ppl']:.4f}, adapter on nf4 base {result['adapter_on_nf4_base_val_ppl']:.4f}, "
                f"base alone {result['nf4_base_alone_val_ppl']:.4f} | |"
            )
            continue
        rate = result.get("tokens_per_s")
        peak = result.get("peak_allocated_gib")
        family = "qlora" if "qlora" in name else "bf16" if ("bf16" in name and "fit" in name) else None
        base = baselines.get(family or "", {}) if not name.startswith("plain") else {}
        ceiling = eval_ceiling if name.startswith("validate") else train_ceiling
        versus = "–"
        if base.get("tokens_per_s"):
            ours, plain = comparable_rates(result, base)
            versus = f"x{ours / plain:.2f}"
            no_dropout = baselines.get("qlora-no-dropout", {})
            if family == "qlora" and no_dropout.get("tokens_per_s"):
                ours, plain = comparable_rates(result, no_dropout)
                versus += f" (x{ours / plain:.2f} of plain without dropout)"
        versus += peer_note(name, result, results)
        wall = result.get("wall_tokens_per_s")
        one_gpu = results.get(one_gpu_workload(name), {})
        if one_gpu is not result and "tokens_per_s" in one_gpu:  # several GPUs: the scaling over one
            versus = scaling_note(result, one_gpu)
        rows.append(
            f"| {name} | {rate:,.0f} | {f'{wall:,.0f}' if wall else '–'} | {'–' if peak is None else f'{peak:.2f}'} | "
            f"{versus} | {rate / ceiling:.0%} |"
        )
    return "\n".join(rows)


def comparable_rates(result: dict, other: dict) -> tuple[float, float]:
    """Two workloads' rates on equal work: positions computed a second when both recorded them, else scored
    tokens a second. Every workload computes a padded row at its full length, but they time different rows
    (``smarter fit`` shuffles them; the others take the split in order), so a tail row with few scored tokens
    in one workload's timed steps and not the other's would skew scored tokens a second (at 16k tokens a row
    the book's tail row scores 7,756)."""
    if result.get("input_tokens_per_s") and other.get("input_tokens_per_s"):
        return result["input_tokens_per_s"], other["input_tokens_per_s"]
    return result["tokens_per_s"], other["tokens_per_s"]


def peer_note(name: str, result: dict, results: dict[str, dict]) -> str:
    """A QLoRA fit against unsloth measured in the same run: speed and peak memory ratios, the recipes that
    recompute layers (lean, offload) against unsloth's offloaded checkpointing, the others against unsloth
    without checkpointing."""
    if not (name.startswith("fit:") and "qlora" in name) or "tokens_per_s" not in result:
        return ""
    peer_name = "unsloth:checkpointing" if "lean" in name or "offload" in name else "unsloth"
    peer = results.get(peer_name, {})
    if "tokens_per_s" not in peer:
        return ""
    memory = result.get("peak_allocated_gib"), peer.get("peak_allocated_gib")
    ours, theirs = comparable_rates(result, peer)
    note = f"; x{ours / theirs:.2f} {peer_name}"
    if all(memory):
        note += f" at x{memory[0] / memory[1]:.2f} its memory"
    return note


def run_round(args: argparse.Namespace, out: Path, started: float, results: dict[str, dict]) -> None:
    """Every workload once into ``results``, each in its own process group (killed as one on timeout or when
    this run is interrupted), its JSON and log in ``out``; a workload not started within the time budget is
    reported as not run."""
    for name in args.only or DEFAULT_WORKLOADS:
        if time.monotonic() - started > args.budget_s:
            results[name] = {"error": "not run: time budget spent"}
            continue
        child = [sys.executable, __file__, "--workload", name, "--out", str(out), "--source", args.source]
        child += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--new-tokens", str(args.new_tokens)]
        child += ["--block", str(args.block), "--batch", str(args.batch)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if name.startswith("unsloth"):  # the peer's own packages first, apart from this project's
            if not os.environ.get(UNSLOTH_SITE_ENV) and importlib.util.find_spec("unsloth") is None:
                results[name] = {"skipped": f"unsloth not installed (set ${UNSLOTH_SITE_ENV} to its kit's folder)"}
                continue
            unsloth_inputs(args.source, args.warmup + args.steps)
            site = os.environ.get(UNSLOTH_SITE_ENV)
            if site:
                env["PYTHONPATH"] = os.pathsep.join([site, str(REPO)])
            env.setdefault("UNSLOTH_COMPILE_LOCATION", str(unsloth_scratch() / "compiled"))
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        began = time.monotonic()
        log = out / (_file_name(name)[: -len(".json")] + ".log")
        with log.open("w") as handle:  # the workload's own output, kept whatever happens to it
            worker = subprocess.Popen(
                child,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
            try:
                worker.wait(timeout=args.workload_timeout_s)
            except BaseException as stopped:  # its time is up, or this run was interrupted (Ctrl-C, SIGTERM)
                os.killpg(worker.pid, signal.SIGKILL)  # with every process it started (DDP ranks)
                worker.wait()
                if not isinstance(stopped, subprocess.TimeoutExpired):
                    raise
        file = out / _file_name(name)
        if file.is_file():
            results[name] = json.loads(file.read_text())
        else:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            results[name] = {"error": f"no result after {time.monotonic() - began:.0f} s: {tail[-300:]}"}
        results[name]["process_s"] = time.monotonic() - began
        print(f"[bench] {name}: {json.dumps(results[name], default=str)[:300]}", flush=True)


def main() -> None:
    global BATCH, BLOCK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for one JSON file per workload")
    parser.add_argument("--only", nargs="*", default=None, help="workloads to run (default: all)")
    parser.add_argument("--source", default="mistral-7b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--block", type=int, default=BLOCK, help="tokens per training row, every workload")
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per training step, every workload")
    parser.add_argument("--workload", default=None, help=argparse.SUPPRESS)  # one workload, in a child
    parser.add_argument("--budget-s", type=float, default=560, help="stop starting workloads after this")
    parser.add_argument("--workload-timeout-s", type=float, default=300, help="stop a workload after this")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of every workload in turn (A B, A B, ...); the table shows each workload's median round "
        "and, for several GPUs, every round's ratio to one GPU; one folder of JSON files per round",
    )
    args = parser.parse_args()
    BATCH, BLOCK = args.batch, args.block
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.workload:  # child process: one workload, one JSON file
        file = out / _file_name(args.workload)
        try:
            result = run_workload(args.workload, args)
        except Exception as error:  # reported in the table, the other workloads still run
            result = {"error": f"{type(error).__name__}: {error}"}
        if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":  # one file, from the first process
            file.write_text(json.dumps(result, indent=2, default=str))
        return
    started = time.monotonic()
    if args.source != "tiny":  # draw the preset's weights once, here: not once per workload and per GPU process
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"[bench] preset weights: {_preset_folder(args.source, device)}", flush=True)
        torch.cuda.empty_cache()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    rounds: list[dict[str, dict]] = []
    try:
        for round_index in range(args.repeats):  # the workloads in turn, round after round: A B C, A B C, ...
            folder = out if args.repeats == 1 else out / f"round-{round_index + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            rounds.append({})
            run_round(args, folder, started, rounds[-1])
    except BaseException:  # interrupted: what finished is summed up all the same, marked as such
        write_summary(out, rounds, interrupted=True)
        raise
    results = write_summary(out, rounds, interrupted=False)
    print(json.dumps(versions()))
    print(summary_table(results))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def write_summary(out: Path, rounds: list[dict[str, dict]], interrupted: bool) -> dict[str, dict]:
    """``summary.json``: the versions, each workload's result (its median round when there are several
    rounds), every round's results, and whether the run was interrupted. Returns the results."""
    finished = [r for r in rounds if r]
    if not finished:
        results: dict[str, dict] = {}
    else:
        results = finished[0] if len(rounds) == 1 else aggregate_rounds(finished)
    summary = {"versions": versions(), "run": run_info(), "results": results}
    summary |= {"rounds": rounds} if len(rounds) > 1 else {}
    summary |= {"interrupted": True} if interrupted else {}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
