"""Measure one variant in its own process: load, held-out quality, prefill, decode, kernels, KL vs reference.

Run by ``smarter compare`` once per variant so that every memory figure starts from a clean process.
Writes one JSON file; on failure the file says ``"status": "failed"`` and why.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from smarter.errors import ConfigError

GIB = 1024**3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` (seconds), GPU synchronized, warm-up runs discarded."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def scored_log_probs(model, dataset, max_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``(tokens, vocab)`` (fp32) at the first ``max_tokens`` scored positions, and their labels."""
    rows, labels = [], []
    count = 0
    for index in range(len(dataset)):
        item = dataset[index]
        scored = item["labels"] != -100
        logits = model(input_ids=item["input_ids"][None].to(device), use_cache=False).logits[0]  # (seq, vocab)
        take = scored.nonzero().flatten()[: max_tokens - count]
        rows.append(torch.log_softmax(logits[take.to(device)].float(), dim=-1).cpu())
        labels.append(item["labels"][take])
        count += len(take)
        if count >= max_tokens:
            break
    return torch.cat(rows), torch.cat(labels)


def compare_distributions(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference || candidate) in nats and top-1 agreement, over positions (rows)."""
    kl = (reference.exp() * (reference - candidate)).sum(dim=-1)  # (tokens,)
    agree = (reference.argmax(dim=-1) == candidate.argmax(dim=-1)).float()
    return {"kl_vs_reference": float(kl.mean().clamp_min(0.0)), "top1_agreement": float(agree.mean())}


def parse_variant(cli_args: list[str]):
    """The variant's LightningCLI objects; a configuration error keeps the parser's message."""
    from smarter.cli import build_cli

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return build_cli(cli_args, run=False)
    except SystemExit:
        lines = [line.strip() for line in captured.getvalue().splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines[-3:]
        raise ConfigError(" | ".join(errors)[-1500:] or "the variant's configuration was rejected") from None


def compare_decoders(
    model, prompt: torch.Tensor, new_tokens: int, repeats: int, eos_id: int, with_hf: bool = True, warmup: int = 2
) -> dict[str, float]:
    """Batch-1 greedy decode timings of our loop and, interleaved, of transformers' ``generate``.

    The two alternate (and swap order every round), so clock ramps and drift hit both alike.
    """
    from lightning_modules.generation import GenerationSettings, generate_timed

    settings = GenerationSettings(max_new_tokens=new_tokens, stop_at_eos=False)
    device = prompt.device

    def ours():
        return generate_timed(model, prompt, settings)

    def hf() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=eos_id,
            )
        _sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        ours()
        if with_hf:
            hf()
    runs, hf_times = [], []
    for round_index in range(repeats):
        if with_hf and round_index % 2:
            hf_times.append(hf())
        runs.append(ours())
        if with_hf and not round_index % 2:
            hf_times.append(hf())
    result = {
        "ttft_ms": 1000 * statistics.median(r.ttft_s for r in runs),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
        "generate_latency_ms": 1000 * statistics.median(r.total_s for r in runs),
    }
    result["our_generate_tokens_per_s"] = new_tokens / (result["generate_latency_ms"] / 1000)
    if with_hf:
        result["hf_generate_latency_ms"] = 1000 * statistics.median(hf_times)
        result["hf_generate_tokens_per_s"] = new_tokens / statistics.median(hf_times)
    return result


def probe(args: argparse.Namespace) -> dict[str, Any]:
    from callbacks import KernelTraceCallback, ThroughputMemoryCallback
    from lightning_modules.model_building import prepare_preset_weights
    from smarter.cli import HEADLESS_TRAINER_ARGS, quiet_known_warnings

    quiet_known_warnings()
    cli_args = ["-c", args.config, *args.overrides, *HEADLESS_TRAINER_ARGS, "--trainer.enable_checkpointing=false"]
    if args.prompts_file:
        cli_args += ["--data.prompts_file", args.prompts_file]
    cli = parse_variant(cli_args)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {
        "status": "ok",
        "config": args.config,
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": module.spec.describe(),
    }

    # -- load (a preset's one-time weight write happens first, untimed) ------------------------
    prepare_preset_weights(module.spec, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    module.model = module.build_model(device).eval()
    _sync(device)
    result["load_s"] = time.perf_counter() - start
    result["weights_gib"] = module.model.get_memory_footprint() / GIB
    if device.type == "cuda":
        result["weights_allocated_gib"] = torch.cuda.memory_allocated(device) / GIB

    if datamodule.tokenizer_name == "auto":  # not attached to a Trainer yet: take the model's own
        datamodule.tokenizer_name = module.tokenizer_source
    datamodule.setup("validate")
    model = module.model
    val = datamodule.datasets["val"]

    # -- prefill -----------------------------------------------------------------------------
    from transformers import DynamicCache

    prefill_ids = val.tensors["input_ids"][0][: args.prefill_tokens][None].to(device)  # (1, prefill_tokens)

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=prefill_ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

    prefill_s = _median_time(prefill, device, warmup=2, repeats=args.repeats)
    result["prefill_tokens"] = int(prefill_ids.shape[1])
    result["prefill_ms"] = 1000 * prefill_s
    result["prefill_tokens_per_s"] = prefill_ids.shape[1] / prefill_s

    # -- batch-1 greedy decode: ours, and transformers' generate on the same model, interleaved ----
    prompt = datamodule.prompt_items()[0]["input_ids"][None].to(device)  # (1, prompt_len)
    timings = compare_decoders(
        model, prompt, args.new_tokens, args.repeats, module.tokenizer.eos_id, with_hf=args.hf_baseline
    )
    result["decode_new_tokens"] = args.new_tokens
    result.update(timings)

    # -- quality versus the reference variant --------------------------------------------------
    log_probs, labels = scored_log_probs(model, val, args.kl_tokens, device)
    result["kl_tokens"] = int(labels.numel())
    if args.is_reference:
        torch.save({"log_probs": log_probs.half(), "labels": labels}, args.reference_file)
        reference = log_probs.half().float()
    elif args.reference_file and Path(args.reference_file).is_file():
        saved = torch.load(args.reference_file, weights_only=True)
        if not torch.equal(saved["labels"], labels):
            raise RuntimeError("the reference scored different tokens; give every variant the same data settings")
        reference = saved["log_probs"].float()
    else:
        reference = None
    if reference is not None:
        result.update(compare_distributions(reference, log_probs.half().float()))

    # -- held-out quality, eval throughput and kernels: last, since Lightning's teardown moves the
    #    module back to the CPU when validate ends ------------------------------------------------
    meter = ThroughputMemoryCallback(warmup_steps=1)
    tracer = KernelTraceCallback(wait=0, warmup=1, active=3, stages=["validate"], output_dir=args.trace_dir)
    trainer.callbacks.extend([meter, tracer])
    trainer.validate(module, datamodule=datamodule)
    metrics = trainer.callback_metrics
    result["val_ppl"] = float(metrics["val/ppl"])
    result["val_bits_per_byte"] = float(metrics["val/bits_per_byte"])
    result["val_loss"] = float(metrics["val/loss"])
    result["eval_tokens_per_s"] = meter.summary.get("validate", {}).get("tokens_per_s")
    if tracer.summaries:
        summary = tracer.summaries[-1]
        result["device_time_per_step_ms"] = summary["totals"]["mean_device_time_per_step_ms"]
        result["kernels_per_step"] = statistics.mean(s["kernel_count"] for s in summary["steps"])
        result["traced_steps"] = summary["totals"]["steps"]
        result["eval_batch_shape"] = summary["metadata"]["batch_shape"]
        result["top_kernels"] = [
            {
                "name": k["name"],
                "self_device_ms": k["self_device_ms"],
                "calls": k["calls"],
                "share": k["share_of_device_time"],
            }
            for k in summary["kernels"][:10]
        ]

    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    else:
        import resource

        result["peak_host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--trace-dir", required=True)
    parser.add_argument("--reference-file", default=None)
    parser.add_argument("--is-reference", action="store_true")
    parser.add_argument("--prompts-file", default=None)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kl-tokens", type=int, default=2048)
    parser.add_argument("--hf-baseline", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra CLI arguments for the variant")
    args = parser.parse_args(argv)
    try:
        result = probe(args)
        code = 0
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            raise
        reason = f"{type(error).__name__}: {error}"
        if isinstance(error, torch.OutOfMemoryError):
            reason = f"out of memory: {error}"
        result = {
            "status": "failed",
            "config": args.config,
            "reason": reason.strip()[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
        code = 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    partial = f"{args.out}.{os.getpid()}.partial"
    Path(partial).write_text(json.dumps(result, indent=2))
    os.replace(partial, args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
