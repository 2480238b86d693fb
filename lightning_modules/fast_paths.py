"""Speed paths chosen by configuration, each off or automatic where it cannot run (a CPU never needs one).

- ``kernels``: Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU (``liger``), on a CUDA GPU with
  ``liger-kernel`` installed; ``auto`` uses them when both are there and the layers are not compiled.
- ``loss``: the summed next-token NLL without the whole batch's fp32 logits: Liger's fused linear
  cross-entropy (``fused``, GPU), or logits made and dropped a chunk of positions at a time, each chunk
  recomputed in backward (``chunked``, anywhere); ``logits`` is the plain way. All give the exact sum
  that perplexity needs.
- ``activation_checkpointing``: recompute decoder layers in backward, ``every-layer`` or ``selective``
  (every ``checkpoint_every``-th layer: less memory than none, less recomputation than all); ``offload``
  recomputes every layer too, and keeps each layer's input in pinned host memory instead of on the GPU,
  copied out and back on a side stream (``OffloadedCheckpointCall``).
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
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from foundation import IGNORE_INDEX

Kernels = Literal["auto", "liger", "off"]
LossPath = Literal["auto", "fused", "chunked", "logits"]
Checkpointing = Literal["off", "every-layer", "selective", "offload"]
Compile = Literal["off", "layers", "layers-cudagraphs"]
AdapterCompute = Literal["auto", "base-dtype", "float32"]


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
    ``keep_last`` layers keep their activations either way. ``offload`` is applied last, over the layers'
    final forward (``offload_checkpointed_layers``)."""
    if mode in ("off", "offload"):
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        recomputed = mode == "every-layer" or index % every == 0
        layer.gradient_checkpointing = recomputed and index < len(layers) - keep_last


def compile_layers(model: torch.nn.Module, cuda_graphs: bool = False, whole_under_ddp: bool = False) -> None:
    """``torch.compile`` every decoder layer of this model (the same code compiles once for all of them): each
    layer's ``forward`` becomes a ``CompiledLayerCall``, on that layer instance only.

    With ``cuda_graphs``, passes that build gradients (training) replay each layer as a CUDA graph, and
    passes without them (validation, the sanity check, ``validate`` and ``test``) run the same compiled
    code without graphs: inductor's graph trees give a graph's outputs the same memory at its next
    replay, which in a pass without gradients is the next layer's call, while the residual stream still
    reads the output it overwrites (transformers' Mistral fails with "accessing tensor output of
    CUDAGraphs that has been overwritten"). In training, autograd keeps each replay's outputs alive.

    With ``whole_under_ddp`` each layer stays one graph under DDP, as on one GPU (see ``CompiledLayerCall``).
    """
    for layer in decoder_layers(model):
        layer.forward = CompiledLayerCall(layer.forward, cuda_graphs, whole_under_ddp)


class CompiledLayerCall:
    """A decoder layer's compiled forward: with graphs in passes that build gradients (``cuda_graphs``), the
    compiled code without graphs otherwise.

    With ``whole_under_ddp``, dynamo's DDP optimizer is off while the layer compiles and runs, and only then
    (``torch._dynamo.config.patch``). That optimizer is made for one graph of the whole model: any graph
    compiled inside DDP's forward is cut where DDP's gradient buckets would end, and its first bucket holds
    1 MB, so a decoder layer with more trainable weight than that (a 7B layer's rank-16 LoRA: 5.2 MB in
    fp32) would compile as two graphs under DDP: two CUDA graphs a layer, and fusions lost at the cut. With
    one graph per layer, DDP's reducer still starts each layer's all-reduce when that layer's backward ends,
    overlapped with the backward of the layers still to come, so the cut buys nothing.
    """

    def __init__(self, forward, cuda_graphs: bool, whole_under_ddp: bool) -> None:
        self.plain = torch.compile(forward, dynamic=False)
        self.graphed = torch.compile(forward, dynamic=False, mode="reduce-overhead") if cuda_graphs else self.plain
        self.scope = contextlib.nullcontext
        if whole_under_ddp:
            from torch._dynamo import config as dynamo_config

            self.scope = functools.partial(dynamo_config.patch, optimize_ddp=False)

    def __call__(self, *args, **kwargs):
        compiled = self.graphed if torch.is_grad_enabled() else self.plain
        with self.scope():
            return compiled(*args, **kwargs)


def offload_checkpointed_layers(model: torch.nn.Module, keep_last: int = 0) -> None:
    """Each decoder layer but the last ``keep_last`` recomputes itself in backward from its input, which waits in
    pinned host memory on a CUDA device (on a CPU it stays where it is). Applied after compilation: the
    compiled layer is what runs, forward and recomputed."""
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    layers = decoder_layers(model)
    offload = HostOffload()
    for index, layer in enumerate(layers):
        if index < len(layers) - keep_last:
            layer.forward = OffloadedCheckpointCall(layer.forward, layer, index, offload)


class HostOffload:
    """Pinned host buffers, one per layer, and the side stream that copies layer inputs out to them and back.

    A layer's input is copied out on the side stream as soon as it exists (the compute stream goes on), and its
    GPU memory is handed back to the allocator when that copy is done (``record_stream``). In backward, when
    the layer after it starts recomputing, the input of the layer before is copied back on the side stream
    (prefetched), so that the copy overlaps that recomputation and backward.
    """

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        self.copied_out: dict[int, torch.cuda.Event] = {}
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.stream: torch.cuda.Stream | None = None

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def out(self, index: int, tensor: torch.Tensor) -> None:
        """Start copying ``tensor`` (a layer's input) to layer ``index``'s pinned buffer."""
        buffer = self.buffers.get(index)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.buffers[index] = buffer
        side = self._side(tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the input is written; last step's reads done
        with torch.cuda.stream(side):
            buffer.copy_(tensor, non_blocking=True)
            self.copied_out[index] = side.record_event()
        tensor.record_stream(side)
        self.prefetched.pop(index, None)

    def back(self, index: int, device: torch.device) -> torch.Tensor:
        """Layer ``index``'s input on ``device`` again, ready for the compute stream."""
        fetched = self.prefetched.pop(index, None)
        if fetched is None:
            self.prefetch(index, device)
            fetched = self.prefetched.pop(index)
        tensor, ready = fetched
        torch.cuda.current_stream(device).wait_event(ready)
        tensor.record_stream(torch.cuda.current_stream(device))
        return tensor

    def prefetch(self, index: int, device: torch.device) -> None:
        """Start copying layer ``index``'s input back (no-op when it is not out, or already coming)."""
        if index not in self.copied_out or index in self.prefetched:
            return
        side = self._side(device)
        with torch.cuda.stream(side):
            side.wait_event(self.copied_out[index])
            tensor = self.buffers[index].to(device, non_blocking=True)
            self.prefetched[index] = (tensor, side.record_event())


class OffloadedCheckpointCall:
    """A decoder layer's forward that, in a pass building gradients, keeps nothing but its input: on a CUDA
    device in pinned host memory (``HostOffload``), elsewhere as it is; backward recomputes the layer from it.
    Passes without gradients run the layer as it is."""

    def __init__(self, forward, layer: torch.nn.Module, index: int, offload: HostOffload) -> None:
        self.forward = forward
        self.layer = layer
        self.index = index
        self.offload = offload
        # an input that needs a gradient, so that autograd records the call even where the hidden states need
        # none (the first layer, over a frozen embedding): the layer's own trainable weights are not inputs
        self.anchor = torch.zeros((), requires_grad=True)

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs):
        if not (torch.is_grad_enabled() and self.layer.training):
            return self.forward(hidden_states, *args, **kwargs)
        return _OffloadedCheckpoint.apply(self, hidden_states, self.anchor, args, kwargs)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: OffloadedCheckpointCall, hidden: torch.Tensor, anchor, args, kwargs):
        ctx.call, ctx.args, ctx.kwargs = call, args, kwargs
        ctx.hidden_needs_grad = hidden.requires_grad
        ctx.device = hidden.device
        kind = hidden.device.type
        # the recomputation runs in backward, outside the forward's autocast: it takes the same one again
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        if hidden.is_cuda:
            call.offload.out(call.index, hidden)
            ctx.kept = None
        else:
            ctx.kept = hidden.detach()
        with torch.no_grad():
            return call.forward(hidden, *args, **kwargs)

    @staticmethod
    def backward(ctx, grad_output):
        call = ctx.call
        if ctx.kept is None:
            hidden = call.offload.back(call.index, ctx.device)
            call.offload.prefetch(call.index - 1, ctx.device)  # the next layer backward will want
        else:
            hidden = ctx.kept
        hidden = hidden.detach().requires_grad_(ctx.hidden_needs_grad)
        devices = [ctx.device] if ctx.device_rng is not None else []
        kind, autocast_on, autocast_dtype = ctx.autocast
        with (
            torch.random.fork_rng(devices=devices, device_type=ctx.device.type),
            torch.enable_grad(),
            torch.autocast(kind, dtype=autocast_dtype, enabled=autocast_on),
        ):
            torch.set_rng_state(ctx.rng)  # the same dropout masks as the forward drew
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, ctx.device)
            output = call.forward(hidden, *ctx.args, **ctx.kwargs)
        torch.autograd.backward(output, grad_output)
        ctx.call = ctx.args = ctx.kwargs = ctx.kept = None
        return None, hidden.grad if ctx.hidden_needs_grad else None, None, None, None


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
