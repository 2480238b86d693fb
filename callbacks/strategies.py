"""Distributed strategies with this framework's defaults (a trainer add-on, chosen in YAML).

``MistralDDPStrategy`` is Lightning's DDP set up for adapter training: the graph is declared static
(every adapter trains at every step, so DDP skips its per-step search for unused parameters and
rebuilds no bucket) unless the run accumulates gradients over several batches, gradients live in
DDP's buckets (no copy into them), the all-reduce may carry them in bfloat16 (half the bytes; each
process's float32 gradients are rounded before averaging), NCCL may be kept off peer-to-peer transfers
between a machine's GPUs (``configs/distributed/ddp.yaml`` does: faster for adapter gradients on 2 H200s),
and DDP is built on the compute stream (Lightning's side stream made every gradient cross streams).

``MistralFSDPStrategy`` is Lightning's FSDP set up for a Mistral with LoRA, the base quantized or not:
each decoder layer is its own FSDP unit, and so is each trainable adapter matrix, so that a layer's
unit holds only frozen weights and FSDP allocates no gradient for them (in a shared unit it would,
for the whole flat parameter; torch warns of it). It trades speed for memory per GPU against DDP
(BENCHMARKS.md has the figures).
Original parameters are kept, and checkpoints are gathered whole on the first process (the module
then keeps only the adapters). A 4-bit base needs ``model.quant_storage: bfloat16``: FSDP shards
floating-point tensors, and bitsandbytes recovers each layer's quantization state after gathering.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from foundation import ConfigError

GRADIENT_REDUCE_DTYPES = ("float32", "bfloat16")


def _set_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments actually set: LightningCLI passes every parameter a strategy (and even the torch
    wrapper behind it) takes, unset ones as None, which would override the defaults chosen here."""
    return {name: value for name, value in kwargs.items() if value is not None}


def _ddp_defaults() -> dict[str, Any]:
    """torch's ``DistributedDataParallel`` arguments with their defaults (``inspect.Parameter.empty`` where
    there is none): they differ between torch versions."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    return {name: p.default for name, p in inspect.signature(DistributedDataParallel.__init__).parameters.items()}


def _check_ddp_arguments(kwargs: dict[str, Any], defaults: dict[str, Any]) -> None:
    """torch's DDP declares no types, so LightningCLI hands its arguments over as written on the command line
    ("maybe" for a flag reached the C++ reducer as a traceback): a value must have its default's type, and
    ``bucket_cap_mb`` (default None) be a positive number, which torch does not check."""
    for name, value in kwargs.items():
        default = defaults.get(name)
        if isinstance(default, bool) and not isinstance(value, bool):
            wanted = "true or false"
        elif type(default) is int and (isinstance(value, bool) or not isinstance(value, int)):
            wanted = "a whole number"
        elif name == "bucket_cap_mb" and not (
            isinstance(value, int | float) and not isinstance(value, bool) and value > 0  # NaN fails too
        ):
            wanted = "a positive number of megabytes"
        else:
            continue
        raise ConfigError(f"MistralDDPStrategy: {name} must be {wanted}, got {value!r}.")


def decoder_layers_and_trainable_leaves(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP wrap policy: a unit for each Mistral decoder layer and for each module without children whose
    own weights train (the LoRA matrices), so that frozen and trainable weights never share a unit."""
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    if recurse:
        return True
    if isinstance(module, MistralDecoderLayer):
        return True
    has_children = next(module.children(), None) is not None
    return not has_children and any(p.requires_grad for p in module.parameters(recurse=False))


class MistralFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` wrapping each Mistral decoder layer, for LoRA and QLoRA.

    Args:
        sharding_strategy: ``FULL_SHARD`` (weights, gradients and optimizer state split across
            processes), ``SHARD_GRAD_OP`` or ``HYBRID_SHARD`` (full shards within a machine).
        **kwargs: Anything else ``FSDPStrategy`` takes.
    """

    def __init__(self, sharding_strategy: str = "FULL_SHARD", **kwargs: Any) -> None:
        # (an auto_wrap_policy=None from LightningCLI once made the whole model one unit, gathered whole
        # and given a full gradient)
        kwargs = _set_arguments(kwargs)
        kwargs.setdefault("auto_wrap_policy", decoder_layers_and_trainable_leaves)
        kwargs.setdefault("use_orig_params", True)
        kwargs.setdefault("state_dict_type", "full")
        super().__init__(sharding_strategy=sharding_strategy, **kwargs)


class MistralDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` for LoRA and QLoRA: a static graph (without gradient accumulation),
    gradients as views of DDP's buckets, and a chosen all-reduce dtype.

    Args:
        gradient_reduce_dtype: ``float32`` (exact: the mean of every process's gradients, as one process
            with the whole batch would compute it up to summation order) or ``bfloat16`` (half the bytes
            on the wire, gradients rounded to bf16 before the mean).
        static_graph: Every trainable weight gets a gradient at every step (true of LoRA; set false for
            a model with conditional branches). Unset: true, unless the run accumulates gradients over
            several batches (``trainer.accumulate_grad_batches``), which torch's DDP cannot do with a
            static graph (it skips the all-reduce of every batch but the last).
        gradient_as_bucket_view: Gradients are views into DDP's all-reduce buckets (saves a copy and the
            memory of one gradient set).
        nccl_peer_to_peer: Let NCCL move gradients between the GPUs of a machine directly (NVLink or PCIe
            peer access, its default). False sets ``NCCL_P2P_DISABLE=1`` in every process before NCCL
            starts: the all-reduce then goes through host memory, slower, but its kernels no longer contend
            with the backward's matrix products for the GPU's memory (see BENCHMARKS.md for when it pays).
        **kwargs: Anything else ``DDPStrategy`` takes (``bucket_cap_mb``, ``timeout``, ...).
    """

    def __init__(
        self,
        gradient_reduce_dtype: str = "float32",
        static_graph: bool | None = None,
        gradient_as_bucket_view: bool = True,
        nccl_peer_to_peer: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(nccl_peer_to_peer, bool):
            raise ConfigError(
                f"MistralDDPStrategy: nccl_peer_to_peer must be true or false, got {nccl_peer_to_peer!r}."
            )
        self.nccl_peer_to_peer = nccl_peer_to_peer
        if gradient_reduce_dtype not in GRADIENT_REDUCE_DTYPES:
            raise ConfigError(
                f"MistralDDPStrategy: gradient_reduce_dtype must be one of {', '.join(GRADIENT_REDUCE_DTYPES)}, "
                f"got {gradient_reduce_dtype!r}."
            )
        if gradient_reduce_dtype == "bfloat16":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            kwargs.setdefault("ddp_comm_hook", bf16_compress_hook)
        self.gradient_reduce_dtype = gradient_reduce_dtype
        # DDP's defaults, except the buffers, which a LoRA Mistral never changes: no broadcast each step
        # (torch 2.13 renames the per-forward part of broadcast_buffers to forward_sync_buffers)
        kwargs = _set_arguments(kwargs)
        defaults = _ddp_defaults()
        _check_ddp_arguments(kwargs, defaults)
        buffers = "forward_sync_buffers" if "forward_sync_buffers" in defaults else "broadcast_buffers"
        kwargs.setdefault(buffers, False)
        if static_graph is not None:  # unset: decided when DDP is built (see _setup_model)
            kwargs["static_graph"] = static_graph
        super().__init__(gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)

    def setup_environment(self) -> None:
        if not self.nccl_peer_to_peer:  # read by NCCL when its communicator starts, after this
            os.environ["NCCL_P2P_DISABLE"] = "1"
        super().setup_environment()

    @property
    def static_graph_setting(self) -> bool | None:
        """``static_graph`` as configured; None when unset."""
        return self._ddp_kwargs.get("static_graph")

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP built on the stream the training steps run on. Lightning (2.6) builds it on a new side stream;
        DDP holds each parameter's gradient-accumulation node from then on, and torch runs that node on the
        stream it was made on, so every adapter gradient of every step crossed from the compute stream to
        the side stream and back (torch warns: "The AccumulateGrad node's stream does not match ...")."""
        from torch.nn.parallel import DistributedDataParallel

        kwargs = dict(self._ddp_kwargs)
        kwargs.setdefault("static_graph", not accumulates_gradients(self.lightning_module.trainer))
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **kwargs)


def accumulates_gradients(trainer) -> bool:
    """Whether some optimizer steps of this run sum the gradients of several batches."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    scheduled = any(isinstance(callback, GradientAccumulationScheduler) for callback in trainer.callbacks)
    return trainer.accumulate_grad_batches > 1 or scheduled


def check_strategy_fits_accumulation(trainer) -> None:
    """Refuse a static DDP graph with gradient accumulation before weights load: torch's DDP skips the
    all-reduce of the batches before an optimizer step (``no_sync``), which a static graph does not allow
    (its reducer fails an internal assertion in the first backward)."""
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or not accumulates_gradients(trainer):
        return
    if getattr(strategy, "_ddp_kwargs", {}).get("static_graph"):
        batches = trainer.accumulate_grad_batches
        how = f"trainer.accumulate_grad_batches {batches}" if batches > 1 else "a GradientAccumulationScheduler"
        raise ConfigError(
            f"{type(strategy).__name__} with static_graph true cannot accumulate gradients ({how}): leave "
            "trainer.strategy.static_graph unset (or set it false), or accumulate no gradients."
        )
