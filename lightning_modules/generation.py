"""Timed batch-1 decoding with a KV cache: time to first token, decode tokens/s, total latency.

A short loop around the model's forward (prefill once, then one token per step), with the GPU
synchronized around the timed regions. Prefill keeps only the last position's logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from foundation import ConfigError, synchronize


@dataclass
class GenerationSettings:
    """How ``predict`` decodes.

    Args:
        max_new_tokens: Tokens generated per prompt.
        do_sample: Sample (with ``temperature`` / ``top_p``) instead of greedy decoding.
        temperature: Softmax temperature when sampling.
        top_p: Nucleus sampling mass when sampling (1.0 keeps every token).
        seed: Seed of the sampler (each prompt gets ``seed + prompt index``).
        stop_at_eos: Stop at EOS; set False to always generate ``max_new_tokens`` (fixed-length
            timing: checking for EOS forces a host sync every step).
        warmup: Untimed generations before the first prompt (kernel selection, allocator, caches).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = False
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"model.generation.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature <= 0:
            raise ConfigError(f"model.generation.temperature must be > 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"model.generation.top_p must be in (0, 1], got {self.top_p}.")
        if self.warmup < 0:
            raise ConfigError(f"model.generation.warmup must be >= 0, got {self.warmup}.")


@dataclass
class TimedGeneration:
    """New token ids and the timings of one generation."""

    new_tokens: list[int]
    ttft_s: float
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        decode_steps = len(self.new_tokens) - 1
        decode_time = self.total_s - self.ttft_s
        return decode_steps / decode_time if decode_steps > 0 and decode_time > 0 else float("nan")


def _choose(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ``(batch, 1)`` from last-position logits ``(batch, vocab)``."""
    if not settings.do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > settings.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)


@torch.inference_mode()
def generate_timed(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    settings: GenerationSettings,
    eos_id: int | None = None,
    sample_seed: int | None = None,
) -> TimedGeneration:
    """Decode after ``input_ids`` ``(1, prompt_len)`` and time it.

    Args:
        model: A Hugging Face causal LM (peft-wrapped or not).
        input_ids: Prompt ids on the model's device, BOS first.
        settings: Decoding settings.
        eos_id: End-of-sequence id, used when ``settings.stop_at_eos``.
        sample_seed: Seed of this generation's sampler.
    """
    from transformers import DynamicCache

    device = input_ids.device
    generator = None
    if settings.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed if sample_seed is None else sample_seed)
    cache = DynamicCache()
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = _choose(out.logits[:, -1], settings, generator)  # (1, 1)
    tokens = [token]
    synchronize(device)
    first = time.perf_counter()
    for _ in range(settings.max_new_tokens - 1):
        if settings.stop_at_eos and eos_id is not None and int(token) == eos_id:
            break
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = _choose(out.logits[:, -1], settings, generator)
        tokens.append(token)
    synchronize(device)
    end = time.perf_counter()
    new_tokens = torch.cat(tokens, dim=1)[0].tolist()
    if settings.stop_at_eos and eos_id in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(eos_id)]
    return TimedGeneration(new_tokens=new_tokens, ttft_s=first - start, total_s=end - start)
