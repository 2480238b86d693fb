"""Speed paths chosen by configuration, each off or automatic where it cannot run (a CPU never needs one).

- ``kernels``: Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU (``liger``), on a CUDA GPU with
  ``liger-kernel`` installed; ``auto`` uses them when both are there and the layers are not compiled.
- ``loss``: the summed next-token NLL without the whole batch's fp32 logits: Liger's fused linear
  cross-entropy (``fused``, GPU), or logits made and dropped a chunk of positions at a time, each chunk
  recomputed in backward (``chunked``, anywhere); ``logits`` is the plain way. All give the exact sum
  that perplexity needs.
- ``activation_checkpointing``: recompute decoder layers in backward, ``every-layer`` or ``selective``
  (every ``checkpoint_every``-th layer: less memory than none, less recomputation than all).
- ``compile``: ``torch.compile`` each decoder layer (regional compilation: one compile serves all 32
  layers, and it composes with checkpointing and bitsandbytes 4-bit). ``layers-cudagraphs`` also
  replays each compiled layer, forward and backward, as a CUDA graph (inductor's ``reduce-overhead``) in
  training (evaluation runs the compiled layers without graphs: see ``compile_layers``):
  a 7B QLoRA step launches about 6,000 kernels and small ops (bitsandbytes' dequantization is a Python
  call each time), and on an H200 the host falls behind the GPU; a graph is one launch.
- ``lora.compute``: the dtype LoRA adapters multiply in. peft keeps adapter weights in float32 over a
  16-bit base and, outside autocast, copies every adapter's input to float32: seven float32 copies of
  the hidden states per layer, each kept for backward (multiplying in bf16 lowers ``qlora-fast``'s peak
  memory by about a quarter: BENCHMARKS.md). ``base-dtype`` multiplies in the
  base's dtype under autocast, the weights, their gradients and the optimizer state staying float32
  (mixed precision, as the plain Trainer way with ``bf16=True``); ``auto`` does so on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from foundation import IGNORE_INDEX

Kernels = Literal["auto", "liger", "off"]
LossPath = Literal["auto", "fused", "chunked", "logits"]
Checkpointing = Literal["off", "every-layer", "selective"]
Compile = Literal["off", "layers", "layers-cudagraphs"]
AdapterCompute = Literal["auto", "base-dtype", "float32"]


@functools.cache
def liger_available() -> bool:
    """Liger's kernels can run here: the package is installed and a CUDA GPU is visible (asked once)."""
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def resolve_kernels(kernels: str, device: torch.device, compile_mode: str = "off") -> str:
    """``liger`` or ``off`` for this device. ``auto`` takes Liger on a GPU where it is installed, but not
    under compiled layers: inductor fuses RMSNorm, RoPE and SwiGLU itself, and Liger's RMSNorm kernel
    does not compile inside inductor's graph (liger-kernel 0.8.5, torch 2.11)."""
    if kernels == "auto":
        return "liger" if device.type == "cuda" and liger_available() and compile_mode == "off" else "off"
    return kernels


def kernels_for_decoding(kernels: str, decoder: str) -> str:
    """The kernels setting for a model built to decode with ``decoder`` (already resolved): ``auto`` leaves
    Liger out of a compiled decode step, where its Triton RMSNorm does not trace and splits the CUDA graph
    at every norm (65 graphs a token, several times slower than without Liger: BENCHMARKS.md)."""
    return "off" if kernels == "auto" and decoder == "static-compiled" else kernels


def resolve_loss(loss: str, device: torch.device) -> str:
    """``fused``, ``chunked`` or ``logits`` for this device. ``auto``: on a GPU, fused with Liger, else
    chunked; on a CPU, the plain logits (memory is not what limits a CPU run, and recomputing chunks
    costs time)."""
    if loss == "auto":
        if device.type != "cuda":
            return "logits"
        return "fused" if liger_available() else "chunked"
    return loss


def resolve_adapter_compute(compute: str, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The 16-bit dtype adapters multiply in (under autocast), or None for float32 (peft's own way)."""
    if dtype == torch.float32 or compute == "float32" or (compute == "auto" and device.type != "cuda"):
        return None
    return dtype


def keep_adapter_inputs_uncast(model: torch.nn.Module) -> None:
    """Stop peft's adapter layers copying their input to the adapters' float32 (autocast does the casting)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def store_adapters_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep every LoRA weight in ``dtype``: for decoding with ``base-dtype`` adapters, which multiply in that
    dtype under autocast in training and evaluation (the same rounding), and which the decode loop, run
    without autocast, would otherwise meet in float32 with 16-bit inputs."""
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.to(dtype)


def adapter_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or nothing when adapters compute in float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def apply_liger_kernels(model: torch.nn.Module) -> None:
    """Swap RMSNorm, RoPE and SwiGLU of a (not yet LoRA-wrapped) Mistral for Liger's fused kernels."""
    from liger_kernel.transformers import apply_liger_kernel_to_mistral

    apply_liger_kernel_to_mistral(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
    )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Mistral, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, every: int = 2, keep_last: int = 0) -> None:
    """Recompute decoder layers in backward: all of them, or every ``every``-th (``selective``); the last
    ``keep_last`` layers keep their activations either way."""
    if mode == "off":
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        recomputed = mode == "every-layer" or index % every == 0
        layer.gradient_checkpointing = recomputed and index < len(layers) - keep_last


def compile_layers(model: torch.nn.Module, cuda_graphs: bool = False) -> None:
    """``torch.compile`` every decoder layer in place (the same code compiles once for all of them).

    With ``cuda_graphs``, passes that build gradients (training) replay each layer as a CUDA graph, and
    passes without them (validation, the sanity check, ``validate`` and ``test``) run the same compiled
    code without graphs: inductor's graph trees give a graph's outputs the same memory at its next
    replay, which in a pass without gradients is the next layer's call, while the residual stream still
    reads the output it overwrites (transformers' Mistral fails with "accessing tensor output of
    CUDAGraphs that has been overwritten"). In training, autograd keeps each replay's outputs alive.

    Under DDP each layer stays one graph, as on one GPU (see ``keep_layer_graphs_whole``).
    """
    keep_layer_graphs_whole()
    for layer in decoder_layers(model):
        if not cuda_graphs:
            layer.compile(dynamic=False)
            continue
        forward = layer.forward
        graphed = torch.compile(forward, dynamic=False, mode="reduce-overhead")
        plain = torch.compile(forward, dynamic=False)
        layer.forward = functools.partial(_graphed_with_gradients, graphed, plain)


def keep_layer_graphs_whole() -> None:
    """Turn off dynamo's DDP optimizer (process-wide). It is made for one graph of the whole model: any graph
    compiled inside DDP's forward is cut where DDP's gradient buckets would end, and its first bucket holds
    1 MB, so a decoder layer with more trainable weight than that (a 7B layer's rank-16 LoRA: 5.2 MB in
    fp32) would compile as two graphs under DDP: two CUDA graphs a layer, fusions lost at the cut, about 14
    more kernels a layer a step than one GPU runs. With one graph per layer, DDP's reducer still starts each
    layer's all-reduce when that layer's backward ends, overlapped with the backward of the layers still to
    come, so the cut buys nothing (and, measured on 2 H200s, costs nothing measurable either).
    """
    import torch._dynamo

    torch._dynamo.config.optimize_ddp = False


def _graphed_with_gradients(graphed, plain, *args, **kwargs):
    return graphed(*args, **kwargs) if torch.is_grad_enabled() else plain(*args, **kwargs)


def _chunk_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()  # (rows, vocab), in the weight's dtype, as the plain LM head computes it
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_nll_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 2048
) -> torch.Tensor:
    """Summed NLL (fp32) of ``labels`` under ``hidden @ weight.T``, ``chunk_rows`` positions at a time.

    Args:
        hidden: ``(positions, hidden)`` final hidden states.
        weight: ``(vocab, hidden)`` LM head weight.
        labels: ``(positions,)`` targets, ``IGNORE_INDEX`` where not scored.
        chunk_rows: Positions per chunk; with gradients, each chunk's logits are recomputed in backward
            instead of kept, so at most one chunk of logits is alive.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_nll_sum, hidden[rows], weight, labels[rows], use_reentrant=False)
        else:
            total = total + _chunk_nll_sum(hidden[rows], weight, labels[rows])
    return total


def fused_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL by Liger's fused linear cross-entropy (no logits kept; fp32 softmax)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return loss(weight, hidden, labels).float()
