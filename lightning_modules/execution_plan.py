"""Which code actually runs: one ``ExecutionPlan`` per run, resolved once by ``resolve_plan``.

The options that choose a speed path (``model.kernels``, ``model.loss``, ``model.compile``,
``model.activation_checkpointing``, ``model.lora.compute``, ``model.generation.decoder`` and ``matvec``)
interact with each other and with the strategy, the device and the installed packages. ``resolve_plan`` is
the one place that decides: a pure function of the model spec, the loss, the decoding settings, the
stage and the ``Platform`` (device, its compute capability, strategy, precision, installed packages). The
module builds and runs its model from the plan, the CLI's pre-flight checks are its refusals, the study
and the benchmarks read it, and ``smarter fit ... --print_plan`` prints it with the reason for each
choice.

Stages: ``fit`` covers the validations inside it. Its training passes replay CUDA-graph layers
(``training_graphs``) while its validation passes run the same compiled layers without graphs
(``evaluation_graphs`` is never on: a graph's outputs are overwritten by its next replay, which without
gradients is the next layer's call), and gradients coming out of graphs are zeroed in place, never
dropped, across every train -> validate -> train transition (``gradients_zeroed_in_place``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from foundation import ConfigError

Stage = Literal["fit", "validate", "test", "predict"]
STAGES: tuple[str, ...] = get_args(Stage)
# the dtype Lightning's FSDP precision plugin casts the whole module to before sharding ("true" precisions)
FSDP_CASTS_TO = {"bf16-true": "bfloat16", "16-true": "float16", "32-true": "float32", "64-true": "float64"}


@dataclass(frozen=True)
class Platform:
    """What a run has to work with.

    Args:
        device: ``cpu`` or ``cuda`` (any other torch device type runs the plain paths).
        capability: The CUDA device's compute capability, e.g. ``(9, 0)``; None off CUDA.
        liger: ``liger-kernel`` is installed.
        triton: Triton is installed.
        strategy: ``single`` (one device), ``ddp``, ``fsdp``, or ``other`` (a strategy of another kind).
        strategy_name: The strategy's class name, for messages.
        precision: The trainer's precision (``bf16-true``, ``32-true``...), where the strategy casts by it.
        fsdp_param_dtype: FSDP's mixed-precision parameter dtype, when it has one.
        grad_scaler: The precision plugin scales the loss (float16 mixed precision): it steps the optimizer itself.
    """

    device: str = "cpu"
    capability: tuple[int, int] | None = None
    liger: bool = False
    triton: bool = False
    strategy: str = "single"
    strategy_name: str = "SingleDeviceStrategy"
    precision: str | None = None
    fsdp_param_dtype: str | None = None
    grad_scaler: bool = False

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @classmethod
    def detect(cls, where: Any = "cpu") -> Platform:
        """The platform of a Lightning strategy, or of a bare device (``torch.device`` or its name)."""
        from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy

        strategy, kind, precision, param_dtype, scaler = None, "single", None, None, False
        if isinstance(where, Strategy):
            strategy = where
            scaler = getattr(strategy.precision_plugin, "scaler", None) is not None
            device = torch.device(strategy.root_device)
            if isinstance(strategy, FSDPStrategy):
                kind = "fsdp"
                precision = strategy.precision_plugin.precision
                mixed = strategy.mixed_precision_config
                if mixed is not None and mixed.param_dtype is not None:
                    param_dtype = str(mixed.param_dtype).removeprefix("torch.")
            elif isinstance(strategy, DDPStrategy):
                kind = "ddp"
            elif not isinstance(strategy, SingleDeviceStrategy):
                kind = "other"
        else:
            device = torch.device(where)
        capability = None
        if device.type == "cuda" and torch.cuda.is_available():
            capability = tuple(torch.cuda.get_device_capability(device))
        return cls(
            device=device.type,
            capability=capability,
            liger=importlib.util.find_spec("liger_kernel") is not None,
            triton=importlib.util.find_spec("triton") is not None,
            strategy=kind,
            strategy_name=type(strategy).__name__ if strategy is not None else "SingleDeviceStrategy",
            precision=precision,
            fsdp_param_dtype=param_dtype,
            grad_scaler=scaler,
        )


@dataclass(frozen=True)
class ExecutionPlan:
    """What runs, decided once. Each field's reason is in ``reasons`` (``why(field)``).

    Args:
        stage: ``fit``, ``validate``, ``test`` or ``predict``.
        platform: What the plan was resolved for.
        kernels: ``liger`` (Liger's RMSNorm, RoPE and SwiGLU) or ``off``.
        loss: How the summed NLL is computed: ``fused``, ``chunked`` or ``logits``.
        compile: The decoder layers: ``off``, ``layers`` (compiled) or ``layers-cudagraphs``.
        training_graphs: Training passes replay each compiled layer as a CUDA graph.
        evaluation_graphs: Passes without gradients replay graphs (never: see the module docstring).
        gradients_zeroed_in_place: Gradients are allocated once and zeroed in place, never dropped, at every
            optimizer step and before every validation inside fit (they come out of CUDA graphs).
        layer_graphs_whole_under_ddp: Each compiled layer stays one graph under DDP (dynamo's DDP optimizer is
            turned off around the compiled layers' calls, and nowhere else).
        activation_checkpointing: ``off``, ``every-layer`` or ``selective``.
        adapter_compute: The dtype LoRA adapters multiply in (``float32``, or the base's 16-bit dtype under
            autocast); None without adapters.
        adapters_stored_in: The dtype adapter weights are stored in for decoding without autocast; None keeps them.
        decoder: ``dynamic``, ``static`` or ``static-compiled`` (predict only, else None).
        matvec: ``library`` or ``triton`` (predict only, else None).
        fixed_batch_shape: Every training batch has one shape (compiled layers recompile on a new one).
        optimizer_kernel: How AdamW updates the weights: ``fused`` (one kernel over every tensor), ``default``
            (torch's choice), ``bitsandbytes`` (its 8-bit optimizers); None outside fit.
        divergence_check: When a non-finite loss or gradient norm stops the run: ``synchronous`` (the host reads
            the step's verdict before the update: one wait for the GPU a step) or ``deferred`` (the fused update
            skips a non-finite step on the GPU, and the host reads the verdict one step later, or before any
            checkpoint or the end of training); None outside fit.
        reasons: ``(field, why)`` pairs.
    """

    stage: str
    platform: Platform
    kernels: str
    loss: str
    compile: str
    training_graphs: bool
    evaluation_graphs: bool
    gradients_zeroed_in_place: bool
    layer_graphs_whole_under_ddp: bool
    activation_checkpointing: str
    adapter_compute: str | None
    adapters_stored_in: str | None
    decoder: str | None
    matvec: str | None
    fixed_batch_shape: bool
    optimizer_kernel: str | None = None
    divergence_check: str | None = None
    reasons: tuple[tuple[str, str], ...] = ()

    def why(self, field: str) -> str:
        return dict(self.reasons)[field]

    @property
    def adapter_dtype(self) -> torch.dtype | None:
        """The 16-bit dtype adapters multiply in under autocast, or None (float32, or no adapters)."""
        if self.adapter_compute in (None, "float32"):
            return None
        return getattr(torch, self.adapter_compute)

    def choices(self) -> dict[str, object]:
        """The decided fields, by name (without the platform and the reasons)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("platform", "reasons")
        }

    def describe(self) -> str:
        """The plan as a table a person reads: each choice and why."""
        platform = self.platform
        where = platform.device + (
            f" (capability {platform.capability[0]}.{platform.capability[1]})" if platform.capability else ""
        )
        lines = [
            f"execution plan for {self.stage} on {where}, {platform.strategy_name}"
            f"{', precision ' + platform.precision if platform.precision else ''}"
            f"; liger-kernel {'installed' if platform.liger else 'not installed'}"
            f", triton {'installed' if platform.triton else 'not installed'}",
        ]
        choices = self.choices()
        choices.pop("stage")
        width = max(len(name) for name in choices)
        for name, value in choices.items():
            shown = "-" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"  {name:<{width}}  {shown:<18} {self.why(name)}")
        return "\n".join(lines)


def resolve_plan(
    spec: Any,
    stage: str,
    platform: Platform,
    loss: str = "auto",
    decoder: str = "auto",
    matvec: str = "auto",
    optimizer: str = "adamw",
) -> ExecutionPlan:
    """The plan for ``spec`` (a ``ModelSpec``) in ``stage`` on ``platform``; a ``ConfigError`` that says what to
    change when the combination cannot run. Reads nothing but its arguments.

    Args:
        spec: The model spec (``lightning_modules.ModelSpec``): its kernels, compile, checkpointing, LoRA,
            quantization and dtype settings.
        stage: ``fit``, ``validate``, ``test`` or ``predict``.
        platform: Device, strategy, precision and installed packages.
        loss: ``model.loss``: ``auto``, ``fused``, ``chunked`` or ``logits``.
        decoder: ``model.generation.decoder``.
        matvec: ``model.generation.matvec``.
        optimizer: ``model.optimizer``: ``adamw``, ``adamw-8bit`` or ``paged-adamw-8bit``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    reasons: dict[str, str] = {}
    cuda = platform.cuda
    liger_runs = cuda and platform.liger
    _refuse_what_the_strategy_cannot_carry(spec, platform)

    # ---- decoding (predict) ---------------------------------------------------------------------------
    decoder_kind = matvec_kind = None
    if stage == "predict":
        decoder_kind, matvec_kind = resolve_decoding(decoder, matvec, platform, reasons)
    else:
        reasons["decoder"] = reasons["matvec"] = "only predict decodes"

    # ---- the layers: compiled or not, with graphs or not -----------------------------------------------
    compiled = spec.compile
    if compiled == "layers-cudagraphs" and spec.activation_checkpointing != "off":
        raise ConfigError(
            "model.compile=layers-cudagraphs cannot recompute checkpointed layers (the replayed graphs "
            "overwrite the outputs that recomputation needs); set model.compile: layers, or "
            "model.activation_checkpointing: off."
        )
    if compiled == "layers-cudagraphs" and platform.strategy == "fsdp":
        raise ConfigError(
            f"model.compile=layers-cudagraphs cannot run under {platform.strategy_name}, which gathers and "
            "frees each layer's weights around every use; set model.compile: layers or off."
        )
    if compiled != "off" and stage == "predict":
        compiled = "off"
        reasons["compile"] = "decoding changes shape every token; the static decoder compiles its own step"
    elif compiled != "off" and not cuda:
        compiled = "off"
        reasons["compile"] = f"model.compile={spec.compile} speeds up CUDA kernels only; skipped on {platform.device}"
    elif compiled != "off":
        reasons["compile"] = f"model.compile={spec.compile}"
    else:
        reasons["compile"] = "model.compile=off"
    training_graphs = compiled == "layers-cudagraphs" and stage == "fit"
    if compiled == "layers-cudagraphs":
        reasons["training_graphs"] = (
            "training passes replay each layer's graph" if training_graphs else ("no training pass in this stage")
        )
    else:
        reasons["training_graphs"] = "no CUDA-graph layers"
    reasons["evaluation_graphs"] = (
        "passes without gradients run the compiled layers without graphs"
        if (compiled == "layers-cudagraphs")
        else "no CUDA-graph layers"
    )
    reasons["gradients_zeroed_in_place"] = (
        "gradients come out of CUDA graphs: kept across optimizer steps and validations, zeroed in place"
        if training_graphs
        else "gradients are dropped (set to None) as usual"
    )
    whole = compiled != "off" and platform.strategy == "ddp"
    reasons["layer_graphs_whole_under_ddp"] = (
        "one graph per layer under DDP (dynamo's DDP optimizer off around the layers)"
        if whole
        else "no compiled layers under DDP"
    )

    # ---- fused kernels ---------------------------------------------------------------------------------
    if spec.kernels == "liger":
        if not liger_runs:
            raise ConfigError(
                "model.kernels=liger needs a CUDA GPU and liger-kernel (pip install 'scaling-smarter[gpu]'); "
                "set model.kernels: auto (Liger where it runs) or off."
            )
        kernels = "liger"
        reasons["kernels"] = "model.kernels=liger"
    elif spec.kernels == "auto":
        if not liger_runs:
            kernels = "off"
            reasons["kernels"] = "auto: " + (
                "liger-kernel is not installed" if cuda else f"no Liger on {platform.device}"
            )
        elif compiled != "off":
            kernels = "off"
            reasons["kernels"] = "auto: the compiler fuses norms, RoPE and SwiGLU in compiled layers"
        elif decoder_kind == "static-compiled":
            kernels = "off"
            reasons["kernels"] = "auto: Liger's RMSNorm would split the compiled decode step's CUDA graph"
        else:
            kernels = "liger"
            reasons["kernels"] = "auto: CUDA GPU with liger-kernel"
    else:
        kernels = "off"
        reasons["kernels"] = "model.kernels=off"

    # ---- the loss --------------------------------------------------------------------------------------
    lora = spec.lora
    adapter = spec.adapter
    targets = set(lora.target_modules if lora is not None else ()) | set(adapter.target_modules if adapter else ())
    if loss == "fused" and not liger_runs:
        raise ConfigError("model.loss=fused needs a CUDA GPU and liger-kernel; set model.loss: auto or chunked.")
    if "lm_head" in targets:
        loss_path = "logits"
        reasons["loss"] = "an adapter on the LM head: only the plain logits path applies it"
    elif loss == "auto":
        if not cuda:
            loss_path = "logits"
            reasons["loss"] = f"auto: plain logits on {platform.device} (memory is not what limits it)"
        elif liger_runs:
            loss_path = "fused"
            reasons["loss"] = "auto: Liger's fused linear cross-entropy, no fp32 logits kept"
        else:
            loss_path = "chunked"
            reasons["loss"] = "auto: logits a chunk of positions at a time (liger-kernel not installed)"
    else:
        loss_path = loss
        reasons["loss"] = f"model.loss={loss}"

    # ---- checkpointing ---------------------------------------------------------------------------------
    checkpointing = spec.activation_checkpointing
    if checkpointing == "offload" and platform.strategy != "single":
        raise ConfigError(
            f"model.activation_checkpointing=offload runs on one device; under {platform.strategy_name} use "
            "every-layer or selective."
        )
    reasons["activation_checkpointing"] = (
        f"model.activation_checkpointing={checkpointing}"
        + (f", every {spec.checkpoint_every} layers" if checkpointing == "selective" else "")
        + (f", last {spec.keep_last_layers} layers kept" if checkpointing != "off" and spec.keep_last_layers else "")
        + (
            ": each layer's input in pinned host memory, copied on a side stream"
            if checkpointing == "offload" and cuda
            else f": the inputs stay where they are on {platform.device}"
            if checkpointing == "offload"
            else ""
        )
    )

    # ---- adapters --------------------------------------------------------------------------------------
    adapter_compute = stored_in = None
    if lora is not None or adapter is not None:
        compute = lora.compute if lora is not None else "auto"
        sixteen_bit = spec.dtype != "float32" and (compute == "base-dtype" or (compute == "auto" and cuda))
        adapter_compute = spec.dtype if sixteen_bit else "float32"
        if spec.dtype == "float32":
            reasons["adapter_compute"] = "a float32 base: nothing to mix with"
        elif compute == "auto":
            reasons["adapter_compute"] = (
                f"auto: {spec.dtype} under autocast on a GPU (weights, gradients and optimizer state float32)"
                if cuda
                else f"auto: float32 on {platform.device} (peft's way)"
            )
        else:
            reasons["adapter_compute"] = f"model.lora.compute={compute}"
        if sixteen_bit and stage == "predict":
            stored_in = spec.dtype
            reasons["adapters_stored_in"] = (
                "decoding runs without autocast: adapters stored in the dtype they multiply in"
            )
        else:
            reasons["adapters_stored_in"] = "adapter weights kept as built (float32)"
    else:
        reasons["adapter_compute"] = reasons["adapters_stored_in"] = "no adapters"
    fixed = spec.compile != "off"
    reasons["fixed_batch_shape"] = (
        "compiled layers: a short last batch is filled with masked rows" if fixed else "batches may differ in shape"
    )
    optimizer_kernel, divergence_check = _resolve_optimizer_step(optimizer, stage, platform, reasons)
    return ExecutionPlan(
        stage=stage,
        platform=platform,
        kernels=kernels,
        loss=loss_path,
        compile=compiled,
        training_graphs=training_graphs,
        evaluation_graphs=False,
        gradients_zeroed_in_place=training_graphs,
        layer_graphs_whole_under_ddp=whole,
        activation_checkpointing=checkpointing,
        adapter_compute=adapter_compute,
        adapters_stored_in=stored_in,
        decoder=decoder_kind,
        matvec=matvec_kind,
        fixed_batch_shape=fixed,
        optimizer_kernel=optimizer_kernel,
        divergence_check=divergence_check,
        reasons=tuple(reasons.items()),
    )


def _resolve_optimizer_step(
    optimizer: str, stage: str, platform: Platform, reasons: dict[str, str]
) -> tuple[str | None, str | None]:
    """The plan's ``optimizer_kernel`` and ``divergence_check``, their reasons added to ``reasons``."""
    if stage != "fit":
        reasons["optimizer_kernel"] = reasons["divergence_check"] = "no optimizer step in this stage"
        return None, None
    if optimizer != "adamw":
        kernel = "bitsandbytes"
        reasons["optimizer_kernel"] = f"model.optimizer={optimizer}: bitsandbytes' own kernels"
    elif not platform.cuda:
        kernel = "default"
        reasons["optimizer_kernel"] = f"torch's default AdamW on {platform.device}"
    elif platform.strategy not in ("single", "ddp"):
        kernel = "default"
        reasons["optimizer_kernel"] = f"torch's default AdamW under {platform.strategy_name} (sharded weights)"
    else:
        kernel = "fused"
        reasons["optimizer_kernel"] = "CUDA: one fused AdamW kernel over every trained tensor, one host call"
    if kernel != "fused":
        check = "synchronous"
        reasons["divergence_check"] = (
            "the step's verdict is read before the update (only the fused AdamW skips on the GPU)"
        )
    elif platform.grad_scaler:
        check = "synchronous"
        reasons["divergence_check"] = "the loss scaler steps the optimizer and skips non-finite steps itself"
    else:
        check = "deferred"
        reasons["divergence_check"] = (
            "a non-finite step is skipped on the GPU and reported one step later (or before a checkpoint or the "
            "end): the host does not wait for the GPU every step"
        )
    return kernel, check


def resolve_decoding(
    decoder: str, matvec: str, platform: Platform, reasons: dict[str, str] | None = None
) -> tuple[str, str]:
    """The decoder and the mat-vec path of ``predict`` (the plan's ``decoder`` and ``matvec``), their reasons
    added to ``reasons``."""
    reasons = {} if reasons is None else reasons
    cuda = platform.cuda
    if decoder == "auto":
        kind = "dynamic"
        reasons["decoder"] = "auto: transformers' dynamic cache (the compiled step pays off only over many tokens)"
    elif decoder == "static-compiled" and not cuda:
        raise ConfigError("model.generation.decoder=static-compiled needs a CUDA GPU; use auto, static or dynamic.")
    else:
        kind = decoder
        reasons["decoder"] = f"model.generation.decoder={decoder}"
    if matvec == "auto":
        usable = kind == "static-compiled" and cuda and platform.triton
        path = "triton" if usable else "library"
        reasons["matvec"] = (
            "auto: this framework's Triton kernels in the compiled static step"
            if usable
            else "auto: torch's and bitsandbytes' kernels outside the compiled static step"
        )
    else:
        if matvec == "triton":
            if not cuda or not platform.triton:
                raise ConfigError("model.generation.matvec=triton needs a CUDA GPU and Triton; use auto or library.")
            if kind == "dynamic":
                raise ConfigError(
                    "model.generation.matvec=triton runs in the static decoders' step; set model.generation.decoder "
                    "to static or static-compiled, or matvec to auto."
                )
        path = matvec
        reasons["matvec"] = f"model.generation.matvec={matvec}"
    return kind, path


def _refuse_what_the_strategy_cannot_carry(spec: Any, platform: Platform) -> None:
    """A distributed strategy that cannot carry the model's dtype or quantization (before weights load).

    Under FSDP the precision must keep the model's dtype: Lightning's FSDP casts the whole module to a
    "true" precision's dtype (``32-true``, the default, turns a bf16 model into float32), and a cast of
    4-bit weights packed in floating-point containers scrambles them.
    """
    name, dtype, quantization = platform.strategy_name, spec.dtype, spec.quantization
    fsdp = platform.strategy == "fsdp"
    if fsdp and platform.device == "cpu":
        raise ConfigError(f"{name} runs on GPUs only; use trainer.strategy ddp on CPUs.")
    if fsdp:
        precision = platform.precision or "32-true"
        held = FSDP_CASTS_TO.get(precision, dtype)
        computed = platform.fsdp_param_dtype or held
        packed = quantization not in ("none", "int8")  # 4-bit, packed in floating-point containers under FSDP
        if held != dtype or (packed and computed != dtype):
            wanted = {cast: name for name, cast in FSDP_CASTS_TO.items()}.get(dtype, "bf16-true")
            raise ConfigError(
                f"{name} with trainer.precision {precision} would cast the model.dtype {dtype} weights"
                + (" (and the 4-bit weights packed in them)" if packed else "")
                + f" to {computed if held == dtype else held}; set trainer.precision: {wanted} "
                "(configs/distributed/fsdp-qlora.yaml does)."
            )
    if quantization == "none":
        return
    if fsdp:
        if quantization == "int8":
            raise ConfigError(f"{name} cannot shard LLM.int8 weights; use ddp, or model.quantization nf4 with FSDP.")
        if spec.quant_storage == "uint8":
            raise ConfigError(
                f"{name} shards floating-point tensors only; set model.quant_storage: bfloat16 "
                "(configs/distributed/fsdp-qlora.yaml does), or use ddp."
            )
        if spec.quant_storage != dtype:
            raise ConfigError(
                f"{name} needs the 4-bit weights packed in the model's dtype; set model.quant_storage: {dtype}."
            )
        return
    if platform.strategy == "other":
        raise ConfigError(
            f"trainer.strategy {name} cannot carry a bitsandbytes-quantized base; use ddp or "
            "callbacks.strategies.MistralFSDPStrategy (configs/distributed/)."
        )
