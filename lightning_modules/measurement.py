"""Measuring helpers shared by the variant study and the benchmarks: honest timings and
distribution comparisons.

Timed regions synchronize the GPU at both ends and discard warm-up runs; comparisons between two
decoders alternate them (swapping order every round) so clock ramps and drift hit both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from foundation import IGNORE_INDEX, synchronize
from lightning_modules.generation import GenerationSettings, generate_timed


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs, after ``warmup`` discarded runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_hf_generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, eos_id: int):
    """transformers' greedy ``generate`` of exactly ``new_tokens`` after ``prompt``: (seconds, new token ids)."""
    synchronize(prompt.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=eos_id,
        )
    synchronize(prompt.device)
    return time.perf_counter() - start, out[0, prompt.shape[1] :].tolist()


@dataclass
class DecoderTimings:
    """Batch-1 greedy decode timings (medians) of our loop and, optionally, transformers' ``generate``."""

    ttft_ms: float
    decode_tokens_per_s: float
    generate_latency_ms: float
    our_generate_tokens_per_s: float
    hf_generate_latency_ms: float | None = None
    hf_generate_tokens_per_s: float | None = None


def compare_decoders(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int,
    eos_id: int,
    with_hf: bool = True,
    warmup: int = 2,
) -> DecoderTimings:
    """Time batch-1 greedy decoding of ``prompt`` ``(1, prompt_len)`` with our loop and with ``generate``.

    Args:
        model: A Hugging Face causal LM on the prompt's device.
        prompt: Prompt ids, BOS first.
        new_tokens: Tokens generated per run (EOS does not stop it).
        repeats: Timed rounds; medians are reported.
        eos_id: Used as the pad id for ``generate``.
        with_hf: Also time transformers' ``generate``, interleaved with ours.
        warmup: Untimed rounds first.
    """
    settings = GenerationSettings(max_new_tokens=new_tokens, stop_at_eos=False)

    def ours():
        return generate_timed(model, prompt, settings)

    def hf() -> float:
        return timed_hf_generate(model, prompt, new_tokens, eos_id)[0]

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
    latency_s = statistics.median(r.total_s for r in runs)
    timings = DecoderTimings(
        ttft_ms=1000 * statistics.median(r.ttft_s for r in runs),
        decode_tokens_per_s=statistics.median(r.decode_tokens_per_s for r in runs),
        generate_latency_ms=1000 * latency_s,
        our_generate_tokens_per_s=new_tokens / latency_s,
    )
    if with_hf:
        hf_s = statistics.median(hf_times)
        timings.hf_generate_latency_ms = 1000 * hf_s
        timings.hf_generate_tokens_per_s = new_tokens / hf_s
    return timings


@dataclass
class FastDecoderTimings:
    """Batch-1 greedy decode with a static KV cache (compiled with CUDA graphs on a GPU)."""

    decoder: str
    matvec: str  # the step's matrix-vector products: "triton" kernels or the "library" ones
    compile_s: float  # building the cache and the warm-up runs that compile the step
    ttft_ms: float
    decode_tokens_per_s: float
    generate_tokens_per_s: float


def fast_decoder_kind(device: torch.device) -> str:
    """The decoder ``time_fast_decoder`` measures on ``device``: on a GPU the static cache with the compiled
    step, on a CPU the static cache uncompiled."""
    return "static-compiled" if device.type == "cuda" else "static"


def time_fast_decoder(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int, warmup: int = 2
) -> FastDecoderTimings:
    """Time the framework's fast decoder on ``prompt`` ``(1, prompt_len)``: warm-up (and compilation) on this
    very prompt, timed separately, then ``repeats`` timed runs (medians)."""
    from lightning_modules.execution_plan import Platform, resolve_decoding
    from lightning_modules.generation import StaticCacheDecoder

    device = prompt.device
    kind, matvec = resolve_decoding(fast_decoder_kind(device), "auto", Platform.detect(device))
    triton_matvec = matvec == "triton"
    settings = GenerationSettings(max_new_tokens=new_tokens, stop_at_eos=False)
    synchronize(device)
    start = time.perf_counter()
    cache_len = -(-(prompt.shape[1] + new_tokens) // 128) * 128
    decoder = StaticCacheDecoder(model, cache_len, compiled=kind == "static-compiled", triton_matvec=triton_matvec)
    for _ in range(warmup):
        generate_timed(model, prompt, settings, static_decoder=decoder)
    synchronize(device)
    compile_s = time.perf_counter() - start
    runs = [generate_timed(model, prompt, settings, static_decoder=decoder) for _ in range(repeats)]
    latency_s = statistics.median(r.total_s for r in runs)
    return FastDecoderTimings(
        decoder=kind,
        matvec="triton" if triton_matvec else "library",
        compile_s=compile_s,
        ttft_ms=1000 * statistics.median(r.ttft_s for r in runs),
        decode_tokens_per_s=statistics.median(r.decode_tokens_per_s for r in runs),
        generate_tokens_per_s=new_tokens / latency_s,
    )


@torch.inference_mode()
def scored_log_probs(model, dataset, max_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``(tokens, vocab)`` (fp32, on CPU) at the first ``max_tokens`` scored positions
    of an evaluation dataset (rows of ``input_ids`` / ``labels``), and their labels ``(tokens,)``."""
    rows, labels = [], []
    count = 0
    for index in range(len(dataset)):
        item = dataset[index]
        scored = item["labels"] != IGNORE_INDEX
        logits = model(input_ids=item["input_ids"][None].to(device), use_cache=False).logits[0]  # (seq, vocab)
        take = scored.nonzero().flatten()[: max_tokens - count]
        rows.append(torch.log_softmax(logits[take.to(device)].float(), dim=-1).cpu())
        labels.append(item["labels"][take])
        count += len(take)
        if count >= max_tokens:
            break
    return torch.cat(rows), torch.cat(labels)


@dataclass
class DistributionAgreement:
    """How close a variant's next-token distributions are to a reference's."""

    kl_vs_reference: float  # mean KL(reference || candidate), nats
    top1_agreement: float  # fraction of positions whose most likely token is the same


def compare_distributions(reference: torch.Tensor, candidate: torch.Tensor) -> DistributionAgreement:
    """Compare log-probabilities ``(positions, vocab)`` of a candidate with a reference's, row by row."""
    kl = (reference.exp() * (reference - candidate)).sum(dim=-1)  # (positions,)
    agree = (reference.argmax(dim=-1) == candidate.argmax(dim=-1)).float()
    return DistributionAgreement(kl_vs_reference=float(kl.mean().clamp_min(0.0)), top1_agreement=float(agree.mean()))
