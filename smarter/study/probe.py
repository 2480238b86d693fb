"""Measure one variant in its own process: load, prefill, decode, quality versus the reference, and
held-out perplexity with evaluation kernels.

Run by ``smarter compare`` once per variant, so every memory figure starts from a clean process:

    python -m smarter.study.probe --settings STUDY/settings.json --variant nf4-sdpa

It writes ``STUDY/variants/<name>.json`` (a ``VariantResult``); on failure the record says
``"status": "failed"`` and why.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from foundation import (
    GIB,
    ConfigError,
    atomic_torch_save,
    atomic_write_json,
    find_config_error,
    held_lock,
    peak_host_rss_gib,
    synchronize,
)
from smarter.study.records import KernelShare, VariantResult
from smarter.study.settings import StudySettings, resolve_variant, variant_name


@dataclass(frozen=True)
class StudyPaths:
    """Where a study keeps each variant's files."""

    root: Path

    def result(self, name: str) -> Path:
        return self.root / "variants" / f"{name}.json"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def traces(self, name: str) -> Path:
        return self.root / "kernel_traces" / name

    def lock(self, name: str) -> Path:
        return self.root / "variants" / f".{name}.lock"

    @property
    def study_lock(self) -> Path:
        return self.root / ".study.lock"

    @property
    def reference_log_probs(self) -> Path:
        return self.root / "reference_log_probs.pt"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"


def parse_variant(cli_args: list[str]):
    """The variant's LightningCLI objects; a configuration error keeps the parser's one-line message."""
    from smarter.lightning_cli import build_cli

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return build_cli(cli_args, run=False)
    except SystemExit:
        lines = [line.strip() for line in captured.getvalue().splitlines() if line.strip()]
        errors = [line.removeprefix("smarter: error: ") for line in lines if "error" in line.lower()] or lines[-3:]
        raise ConfigError(" | ".join(errors)[-1500:] or "the variant's configuration was rejected") from None


def plan_for_the_study(module, device: torch.device):
    """The variant's execution plan as the study builds it: one model serves evaluation and both decoders, so it
    is the plan to predict with the fast decoder (``fast_decoder_kind``; on a GPU, under ``kernels: auto``,
    without Liger, whose RMSNorm would split the compiled step's graph)."""
    from lightning_modules.execution_plan import Platform, resolve_plan
    from lightning_modules.measurement import fast_decoder_kind

    return resolve_plan(
        module.spec, "predict", Platform.detect(device), loss=module.hparams.loss, decoder=fast_decoder_kind(device)
    )


def load_variant(result: VariantResult, cli, device: torch.device) -> None:
    """Build the variant's model on ``device`` (a preset's one-time weight write first, untimed)."""
    from lightning_modules.model_building import prepare_preset_weights

    module = cli.model
    module.plan = plan_for_the_study(module, device)
    prepare_preset_weights(module.spec, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    module.model = module.build_model(device).eval()
    synchronize(device)
    result.load_s = time.perf_counter() - start
    result.weights_gib = module.model.get_memory_footprint() / GIB
    if device.type == "cuda":
        result.weights_allocated_gib = torch.cuda.memory_allocated(device) / GIB


def measure_prefill(result: VariantResult, model, val, settings: StudySettings, device: torch.device) -> None:
    from transformers import DynamicCache

    from lightning_modules.measurement import median_time

    prefill_ids = val.tensors["input_ids"][0][: settings.prefill_tokens][None].to(device)  # (1, prefill_tokens)

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=prefill_ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

    seconds = median_time(prefill, device, warmup=2, repeats=settings.repeats)
    result.prefill_tokens = int(prefill_ids.shape[1])
    result.prefill_ms = 1000 * seconds
    result.prefill_tokens_per_s = prefill_ids.shape[1] / seconds


def measure_decode(result: VariantResult, cli, settings: StudySettings, device: torch.device) -> None:
    """Batch-1 greedy decode: ours, and transformers' ``generate`` on the same model, interleaved."""
    from lightning_modules.measurement import compare_decoders, time_fast_decoder

    prompt = cli.datamodule.prompt_items()[0]["input_ids"][None].to(device)  # (1, prompt_len)
    eos_id = cli.model.tokenizer.eos_id
    timings = compare_decoders(
        cli.model.model, prompt, settings.new_tokens, settings.repeats, eos_id, with_hf=settings.hf_baseline
    )
    result.decode_new_tokens = settings.new_tokens
    for key, value in asdict(timings).items():
        setattr(result, key, value)
    fast = time_fast_decoder(cli.model.model, prompt, settings.new_tokens, settings.repeats)
    result.fast_decoder = fast.decoder + (" + triton matvec" if fast.matvec == "triton" else "")
    result.fast_ttft_ms = fast.ttft_ms
    result.fast_decode_tokens_per_s = fast.decode_tokens_per_s
    result.fast_generate_tokens_per_s = fast.generate_tokens_per_s
    result.decode_compile_s = fast.compile_s


def measure_agreement(
    result: VariantResult, model, val, settings: StudySettings, paths: StudyPaths, device: torch.device
) -> None:
    """KL and top-1 agreement of next-token distributions against the reference variant's."""
    from lightning_modules.measurement import compare_distributions, scored_log_probs

    log_probs, labels = scored_log_probs(model, val, settings.kl_tokens, device)
    result.kl_tokens = int(labels.numel())
    if result.variant == settings.reference:
        atomic_torch_save({"log_probs": log_probs.half(), "labels": labels}, paths.reference_log_probs)
        reference = log_probs.half().float()
    elif paths.reference_log_probs.is_file():
        saved = torch.load(paths.reference_log_probs, weights_only=True)
        if not torch.equal(saved["labels"], labels):
            raise RuntimeError("the reference scored different tokens; give every variant the same data settings")
        reference = saved["log_probs"].float()
    else:
        return
    agreement = compare_distributions(reference, log_probs.half().float())
    result.kl_vs_reference = agreement.kl_vs_reference
    result.top1_agreement = agreement.top1_agreement


def measure_validation(result: VariantResult, cli, paths: StudyPaths) -> None:
    """Held-out perplexity, evaluation throughput and kernels, through Lightning's own validate loop.

    Run last: Lightning's teardown moves the module back to the CPU when validate ends.
    """
    from callbacks import KernelTraceCallback, ThroughputMemoryCallback

    meter = ThroughputMemoryCallback(warmup_steps=1)
    tracer = KernelTraceCallback(
        wait=0, warmup=1, active=3, stages=["val"], output_dir=str(paths.traces(result.variant))
    )
    cli.trainer.callbacks.extend([meter, tracer])
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    result.val_ppl = float(metrics["val/ppl"])
    result.val_bits_per_byte = float(metrics["val/bits_per_byte"])
    result.val_loss = float(metrics["val/loss"])
    result.eval_tokens_per_s = meter.summary.get("val", {}).get("tokens_per_s")
    if tracer.summaries:
        summary = tracer.summaries[-1]
        result.device_time_per_step_ms = summary["totals"]["mean_device_time_per_step_ms"]
        result.kernels_per_step = statistics.mean(s["kernel_count"] for s in summary["steps"])
        result.traced_steps = summary["totals"]["steps"]
        result.eval_batch_shape = summary["metadata"]["batch_shape"]
        result.top_kernels = [
            KernelShare(
                name=k["name"], self_device_ms=k["self_device_ms"], calls=k["calls"], share=k["share_of_device_time"]
            )
            for k in summary["kernels"][:10]
        ]


def probe(settings: StudySettings, entry: str) -> VariantResult:
    """Every measurement of one variant, in order; raises on the first failure."""
    from smarter.lightning_cli import HEADLESS_TRAINER_ARGS, quiet_known_warnings

    quiet_known_warnings()
    paths = StudyPaths(Path(settings.output_dir))
    config = resolve_variant(entry)
    cli_args = ["-c", str(config), *settings.data_arguments(), *shlex.split(settings.overrides), *HEADLESS_TRAINER_ARGS]
    cli_args.append("--trainer.enable_checkpointing=false")
    if settings.prompts_file:
        cli_args += ["--data.prompts_file", settings.prompts_file]
    cli = parse_variant(cli_args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = VariantResult(
        variant=variant_name(entry),
        config=entry,
        device=str(device),
        device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        model=cli.model.spec.describe(),
    )
    load_variant(result, cli, device)
    cli.datamodule.setup("validate")
    val = cli.datamodule.datasets["val"]
    model = cli.model.model
    measure_prefill(result, model, val, settings, device)
    measure_decode(result, cli, settings, device)
    measure_agreement(result, model, val, settings, paths, device)
    measure_validation(result, cli, paths)
    if device.type == "cuda":
        result.peak_allocated_gib = torch.cuda.max_memory_allocated(device) / GIB
        result.peak_reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
    else:
        result.peak_host_rss_gib = peak_host_rss_gib()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="the study's settings.json")
    parser.add_argument("--variant", required=True, help="the variant entry, as named in the settings")
    args = parser.parse_args(argv)
    settings = StudySettings.load(Path(args.settings))
    name = variant_name(args.variant)
    paths = StudyPaths(Path(settings.output_dir))
    try:
        with held_lock(paths.lock(name), f"variant {name} of {paths.root}"):  # never two probes of one variant
            result = probe(settings, args.variant)
        code = 0
    except KeyboardInterrupt:
        raise
    except BaseException as error:
        config_error = find_config_error(error)
        reason = str(config_error) if config_error else f"{type(error).__name__}: {error}"
        if isinstance(error, torch.OutOfMemoryError):
            reason = f"out of memory: {error}"
        result = VariantResult.failed(
            name, reason.strip()[:2000], config=args.variant, traceback=traceback.format_exc()[-4000:]
        )
        code = 1
    atomic_write_json(paths.result(name), result.to_dict())
    return code


if __name__ == "__main__":
    sys.exit(main())
