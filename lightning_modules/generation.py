"""Timed batch-1 decoding with a KV cache: time to first token, decode tokens/s, total latency.

A short loop around the model's forward (prefill once, then one token per step), with the GPU
synchronized around the timed regions. Prefill keeps only the last position's logits. Two caches:

- ``dynamic``: transformers' ``DynamicCache``, growing each step (works everywhere);
- ``static``: a ``StaticCache`` allocated once for the longest sequence; with ``static-compiled`` the
  one-token step is ``torch.compile``-d with CUDA graphs (``mode="reduce-overhead"``), so a decode
  step is one graph replay instead of hundreds of kernel launches. Batch-1 decode is launch-bound,
  so this is where its speed is.

``auto`` is ``dynamic``: the compiled step costs 30-45 s of compilation before the first token, which
pays off only over many tokens. Asked for by name, it decodes several times faster than transformers'
``generate`` (BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from foundation import ConfigError, synchronize
from lightning_modules.decode_attention import decode_attention_applies
from lightning_modules.matvec_kernels import ROUTING_ATTRIBUTE, decode_routing, use_triton_matvec

Decoder = Literal["auto", "dynamic", "static", "static-compiled"]
Matvec = Literal["auto", "library", "triton"]


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
        warmup: Untimed generations before the first prompt (kernel selection, allocator, caches,
            and the compilation of ``static-compiled``), on the real prompts' shapes.
        decoder: ``auto``, ``dynamic``, ``static`` or ``static-compiled`` (see the module docstring).
        matvec: The one-token step's matrix-vector products and its attention: ``library`` (torch's and
            bitsandbytes'), ``triton`` (this framework's kernels, lightning_modules/matvec_kernels.py and
            decode_attention.py, for float weights and bitsandbytes' 4-bit ones of blocks of 64), or ``auto``
            (``triton`` in the compiled static decoder on a GPU, else ``library``).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = False
    warmup: int = 1
    decoder: Decoder = "auto"
    matvec: Matvec = "auto"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"model.generation.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature <= 0:
            raise ConfigError(f"model.generation.temperature must be > 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"model.generation.top_p must be in (0, 1], got {self.top_p}.")
        if self.warmup < 0:
            raise ConfigError(f"model.generation.warmup must be >= 0, got {self.warmup}.")
        if self.decoder not in get_args(Decoder):
            raise ConfigError(
                f"model.generation.decoder={self.decoder!r}; choose auto, dynamic, static or static-compiled."
            )
        if self.matvec not in get_args(Matvec):
            raise ConfigError(f"model.generation.matvec={self.matvec!r}; choose auto, library or triton.")


def check_generation_fits(prompt_tokens: int, max_new_tokens: int, max_positions: int, which: str = "a prompt") -> None:
    """Refuse a generation that would run past the model's positions (it would fail, or run on garbage)."""
    if prompt_tokens + max_new_tokens > max_positions:
        raise ConfigError(
            f"{which} has {prompt_tokens} tokens; with model.generation.max_new_tokens={max_new_tokens} that is "
            f"{prompt_tokens + max_new_tokens} positions, beyond the model's {max_positions}. Shorten the prompt "
            "or lower model.generation.max_new_tokens."
        )


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


class StaticCacheDecoder:
    """Batch-1 decoding into a ``StaticCache`` of ``max_cache_len`` positions, allocated once.

    With ``compiled``, the one-token step (forward, last-position logits) runs under
    ``torch.compile(mode="reduce-overhead")``: CUDA graphs replay the whole step. Outputs of a replayed
    graph are overwritten by the next replay, so each step marks a new graph step and copies what it
    keeps (the chosen token).

    With ``compiled``, the prompt is read by a CUDA graph too, one per prompt length rounded up to
    ``PREFILL_BUCKET`` (see ``prefill``), without cuDNN's attention, which plans anew for each length.
    Inside ``step`` the one query attends with its key/value head's other queries
    (``grouped_sdpa_attention``) instead of over a copy of the cache per query head; with
    ``triton_matvec`` that attention runs in this framework's kernel (lightning_modules/decode_attention.py;
    measured against cuDNN's in BENCHMARKS.md).

    Args:
        model: A Hugging Face causal LM (peft-wrapped or not), in eval mode.
        max_cache_len: Positions the cache holds: at least the longest prompt plus its new tokens.
        compiled: Compile the one-token step with CUDA graphs (GPU only).
        triton_matvec: The step's matrix-vector products with float weights, and its attention, run in
            this framework's Triton kernels.
        four_bit_matvec: With ``triton_matvec``, bitsandbytes' 4-bit layers (blocks of 64) too, in the kernel
            that decodes nibbles in registers (faster than bitsandbytes' kernel: BENCHMARKS.md). False keeps
            bitsandbytes' kernel for them.
    """

    PREFILL_BUCKET = 32  # prompts are padded to a multiple of this many positions for the prefill graphs
    PREFILL_GRAPHS = 16  # at most this many prompt lengths get a graph; others are read eagerly
    # cuDNN's attention plans anew for each prompt length (tens of milliseconds the first time)
    PREFILL_ATTENTION: tuple[str, ...] | None = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    # the step's attention where this framework's kernel does not take it (without triton_matvec): torch's
    # choice (cuDNN on Hopper; memory-efficient attention measured within 1 % of it, BENCHMARKS.md)
    step_attention: tuple[str, ...] | None = None

    def __init__(
        self,
        model: torch.nn.Module,
        max_cache_len: int,
        compiled: bool,
        triton_matvec: bool = False,
        four_bit_matvec: bool = True,
    ) -> None:
        from transformers import StaticCache

        self.routing = decode_routing(model)
        if triton_matvec:
            use_triton_matvec(model, four_bit=four_bit_matvec)
        use_grouped_decode_attention(model)
        self.triton_matvec = triton_matvec
        self.model = model
        self.max_cache_len = max_cache_len
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        self.compiled = compiled
        self._step = torch.compile(self._one_token, mode="reduce-overhead", fullgraph=False) if compiled else None
        # the prompt is read in a CUDA graph per padded length (see prefill) when the model's kernels allow it:
        # LLM.int8's layers look for outliers with host synchronizations, which a graph cannot hold
        self.graph_prefill = compiled and not any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
        self._prefill_graphs: dict[int, _PrefillGraph] = {}
        self._prefill_pool: Any = None

    def _one_token(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        with _attention_backends(self.step_attention):
            out = self.model(input_ids=token, past_key_values=self.cache, cache_position=position, use_cache=True)
        return out.logits[:, -1]  # (1, vocab)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, vocab)`` after ``token`` ``(1, 1)`` at ``position`` ``(1,)``."""
        with self.routing.switched_on():
            if self._step is None:
                return self._one_token(token, position)
            torch.compiler.cudagraph_mark_step_begin()
            return self._step(token, position).clone()

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache and read the prompt ``(1, prompt_len)``; last-position logits ``(1, vocab)``.

        With ``graph_prefill`` the prompt is padded to a multiple of ``PREFILL_BUCKET`` positions and read
        by the replay of a CUDA graph captured for that length (the first time it comes: warm-up on the real
        prompts captures it). The padding's cache entries lie after the prompt, where each decode step
        writes its own before any query can see it, so they change nothing. Eagerly, a 7B forward costs
        the host tens of milliseconds of launches, which the GPU then waits for. Up to
        ``PREFILL_GRAPHS`` lengths get a graph (sharing one memory pool); other lengths, and every prompt
        if a capture fails, are read eagerly.
        """
        self.cache.reset()
        length = input_ids.shape[1]
        if not self.graph_prefill:
            return self._eager_read(input_ids)
        bucket = min(-(-length // self.PREFILL_BUCKET) * self.PREFILL_BUCKET, self.max_cache_len)
        graph = self._prefill_graphs.get(bucket)
        if graph is None:
            if len(self._prefill_graphs) >= self.PREFILL_GRAPHS:  # a rare length: read eagerly
                return self._eager_read(input_ids)
            graph = self._capture_prefill(bucket, input_ids.device)
            if graph is None:  # graphs are now off, and the cache was reset after the failed capture
                return self._eager_read(input_ids)
            self._prefill_graphs[bucket] = graph
        graph.input_ids[:, :length].copy_(input_ids)
        graph.input_ids[:, length:].zero_()
        graph.last.fill_(length - 1)
        graph.graph.replay()
        return graph.logits.clone()

    def _eager_read(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt read eagerly, unpadded."""
        length, device = input_ids.shape[1], input_ids.device
        last = torch.tensor([length - 1], device=device)
        return self._padded_forward(input_ids, torch.arange(length, device=device), last)

    def _padded_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The forward over ``input_ids`` ``(1, n)`` at cache ``positions`` ``(n,)``; logits ``(1, vocab)`` of the
        position at index ``last`` ``(1,)``. Positions after ``last`` are padding: the cache's length is set back
        to ``last + 1``, where the next token goes (transformers' static cache places each new token at its
        own count of tokens seen, not at the ``cache_position`` given)."""
        with _attention_backends(self.PREFILL_ATTENTION):
            out = self.model(
                input_ids=input_ids,
                past_key_values=self.cache,
                cache_position=positions,
                use_cache=True,
                logits_to_keep=last,
            )
        counts = [layer.cumulative_length for layer in getattr(self.cache, "layers", ())]
        counts = [count for count in counts if isinstance(count, torch.Tensor)]
        if counts:
            # private: torch has no public in-place copy of many tensors in one launch (CUDA-graph step)
            torch._foreach_copy_(counts, [(last[0] + 1).to(counts[0].dtype)] * len(counts))
        return out.logits[:, -1]

    def _capture_prefill(self, bucket: int, device: torch.device) -> _PrefillGraph | None:
        """Capture the read of ``bucket`` positions; ``None`` (and no more graphs) when the model's kernels
        cannot be captured (a host synchronization inside, say): prompts are then read eagerly."""
        input_ids = torch.zeros(1, bucket, dtype=torch.long, device=device)
        positions = torch.arange(bucket, device=device)
        last = torch.zeros(1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # kernels chosen and workspaces allocated before the capture
            self._padded_forward(input_ids, positions, last)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._prefill_pool is None:
            # one memory pool for every prompt length's graph: a replay's temporaries are dead when it ends,
            # and its output is copied out at once, so graphs replayed one at a time can share it
            self._prefill_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._prefill_pool):
                logits = self._padded_forward(input_ids, positions, last)
        except RuntimeError as error:
            warnings.warn(f"prompts are read without a CUDA graph: capturing the read failed ({error})", stacklevel=2)
            self.graph_prefill = False
            torch.cuda.synchronize(device)
            return None
        finally:
            self.cache.reset()
        return _PrefillGraph(graph, input_ids, last, logits)


@dataclass
class _PrefillGraph:
    """A captured prompt read: its graph, its input buffers and its output."""

    graph: Any
    input_ids: torch.Tensor  # (1, bucket)
    last: torch.Tensor  # (1,) index of the prompt's last position
    logits: torch.Tensor  # (1, vocab)


def _attention_backends(names: tuple[str, ...] | None):
    """A context that lets scaled-dot-product attention choose only among ``names`` (SDPBackend members);
    ``None`` leaves torch's choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return contextlib.nullcontext() if names is None else sdpa_kernel([getattr(SDPBackend, name) for name in names])


@torch.inference_mode()
def generate_timed(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    settings: GenerationSettings,
    eos_id: int | None = None,
    sample_seed: int | None = None,
    static_decoder: StaticCacheDecoder | None = None,
) -> TimedGeneration:
    """Decode after ``input_ids`` ``(1, prompt_len)`` and time it.

    Args:
        model: A Hugging Face causal LM (peft-wrapped or not).
        input_ids: Prompt ids on the model's device, BOS first.
        settings: Decoding settings.
        eos_id: End-of-sequence id, used when ``settings.stop_at_eos``.
        sample_seed: Seed of this generation's sampler.
        static_decoder: Decode into this static cache (unset: a ``DynamicCache``).
    """
    from transformers import DynamicCache

    device = input_ids.device
    prompt_len = input_ids.shape[1]
    if static_decoder is not None and prompt_len + settings.max_new_tokens > static_decoder.max_cache_len:
        raise ConfigError(
            f"a prompt of {prompt_len} tokens plus {settings.max_new_tokens} new ones does not fit the static "
            f"cache of {static_decoder.max_cache_len} positions."
        )
    generator = None
    if settings.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed if sample_seed is None else sample_seed)
    cache = DynamicCache() if static_decoder is None else None
    synchronize(device)
    start = time.perf_counter()
    if static_decoder is None:
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    else:
        logits = static_decoder.prefill(input_ids)
    token = _choose(logits, settings, generator)  # (1, 1)
    tokens = [token]
    synchronize(device)
    first = time.perf_counter()
    position = torch.tensor([prompt_len], device=device)
    for _ in range(settings.max_new_tokens - 1):
        if settings.stop_at_eos and eos_id is not None and int(token) == eos_id:
            break
        if static_decoder is None:
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
        else:
            logits = static_decoder.step(token, position)
            position = position + 1
        token = _choose(logits, settings, generator)
        tokens.append(token)
    synchronize(device)
    end = time.perf_counter()
    new_tokens = torch.cat(tokens, dim=1)[0].tolist()
    if settings.stop_at_eos and eos_id in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(eos_id)]
    return TimedGeneration(new_tokens=new_tokens, ttft_s=first - start, total_s=end - start)


GROUPED_ATTENTION = "smarter_grouped_sdpa"  # the name it is registered under with transformers


def use_grouped_decode_attention(model: torch.nn.Module) -> bool:
    """Make an SDPA model's attention ``grouped_sdpa_attention``, registered under this framework's own
    name with transformers' SDPA mask; each attention module is given the model's ``DecodeRouting``. Other
    models, and everything but the one-query steps of the static decoder, keep transformers' own SDPA.
    Returns whether the model uses it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation not in ("sdpa", GROUPED_ATTENTION):
        return False
    AttentionInterface.register(GROUPED_ATTENTION, grouped_sdpa_attention)  # the same entry each time
    AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)
    routing = decode_routing(model)
    for module in base.modules():
        if hasattr(module, "num_key_value_groups"):  # an attention module
            setattr(module, ROUTING_ATTRIBUTE, routing)
    base.set_attn_implementation(GROUPED_ATTENTION)
    return True


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """One query token against a cache of grouped key/value heads (Mistral: 32 query heads, 8 key/value):
    the query heads that share a key/value head are read as that head's queries, so attention reads the
    cache as it is. transformers' SDPA path copies every key/value head once per query head in a compiled
    step (``repeat_kv``): for a 7B decode step, 64 copies of the cache, a few percent of the step.

    Anything else (more query tokens, a mask per head, dropout, other options) goes to transformers' own
    function. Shapes: ``query`` ``(batch, heads, 1, dim)``, ``key``/``value`` ``(batch, kv_heads, cache, dim)``;
    returns ``((batch, 1, heads, dim), None)`` as transformers' attention functions do.
    """
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    plain = attention_mask is None or attention_mask.shape[1] == 1
    extra = any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux"))
    routing = getattr(module, ROUTING_ATTRIBUTE, None)
    if routing is None or not routing.on or queries != 1 or groups == 1 or dropout != 0.0 or not plain or extra:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if routing.routes_matvec and decode_attention_applies(query, key, attention_mask):
        # this framework's kernel (lightning_modules/decode_attention.py) in the step of matvec: triton
        positions = key.shape[2]
        mask = key.new_ones(positions, dtype=torch.bool) if attention_mask is None else attention_mask.reshape(-1)
        scale = scaling if scaling is not None else dim**-0.5
        flat = query.reshape(heads, dim)
        out = torch.ops.smarter.decode_attention(flat, key[0].contiguous(), value[0].contiguous(), mask, scale)
        return out.view(batch, 1, heads, dim), None
    grouped = query.reshape(batch, kv_heads, groups, dim)  # query head h reads key/value head h // groups
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, dim), None
