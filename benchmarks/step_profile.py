"""Where a training step's GPU time goes: a kernel trace of a few steps, every kernel put in one bucket.

Buckets: matrix products (bf16 GEMM), nf4 dequantization, attention, the loss, the optimizer, elementwise work
and norms (inductor's fused kernels among them), copies, and the GPU's idle time within the steps. LoRA's
skinny products run as GEMMs too and cannot be told from the base's by a kernel's name, so
``lora_products_ms`` times them alone, on the same GPU, at the step's shapes.

Add it to any ``smarter fit`` as a callback (through the command, as a user runs it):

    PYTHONPATH=. smarter fit -c configs/finetune/qlora-fast.yaml --trainer.max_steps 12 --trainer.limit_val_batches 0 \\
        --trainer.callbacks+=benchmarks.step_profile.StepProfile --trainer.callbacks.init_args.out profile.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from foundation import atomic_write_json, synchronize

# name fragments (lower case) of each bucket, tried in this order; the first that matches takes the kernel
BUCKETS = [
    ("nf4 dequantize", ("dequantize",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn", "cudnn::fusion")),  # cuDNN's SDPA and its helpers
    ("loss", ("cross_entropy", "crossentropy", "liger_ce", "log_softmax", "nll_loss")),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach", "fused_adam")),
    ("matrix products", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "triton_tem", "_mm_", "matmul")),
    # copies by name: an inductor kernel whose fused ops include a dtype cast ("_to_copy") is a norm or
    # elementwise kernel, not a copy
    ("copies", ("memcpy", "memset", "copy_kernel", "cat_", "catarraybatched")),
    (
        "elementwise and norms",
        ("triton_poi", "triton_red", "triton_per", "elementwise", "reduce", "norm", "rms", "rope", "swiglu", "silu"),
    ),
]


def bucket_of(kernel: str) -> str:
    name = kernel.lower()
    return next((bucket for bucket, parts in BUCKETS if any(part in name for part in parts)), "other")


def breakdown(kernels: list[tuple[str, float, float]], step_ms: list[float], top: int = 25) -> dict:
    """Milliseconds a step per bucket, from kernels ``(name, start_us, end_us)`` over steps of ``step_ms``; idle is
    the steps' time that no kernel covers (overlapping kernels counted once). Also the ``top`` heaviest kernel
    names (milliseconds and launches a step) and the ``top`` longest gaps between kernels, each with the
    kernels either side of it: what the GPU waited between."""
    steps = len(step_ms)
    per_bucket: dict[str, float] = {}
    per_name: dict[str, list[float]] = {}
    for name, start, end in kernels:
        per_bucket[bucket_of(name)] = per_bucket.get(bucket_of(name), 0.0) + (end - start) / 1000 / steps
        totals = per_name.setdefault(name, [0.0, 0.0])
        totals[0] += (end - start) / 1000 / steps
        totals[1] += 1 / steps
    busy, last, last_name, gaps = 0.0, float("-inf"), None, []
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        if last_name is not None and start > last:
            gaps.append((start - last, last_name, name))
        if end > last:
            busy += end - max(start, last)
            last, last_name = end, name
    step = sum(step_ms) / steps
    per_bucket["idle"] = max(step - busy / 1000 / steps, 0.0)
    ordered = dict(sorted(per_bucket.items(), key=lambda item: -item[1]))
    heaviest = sorted(per_name.items(), key=lambda item: -item[1][0])[:top]
    longest = sorted(gaps, key=lambda gap: -gap[0])[:top]
    return {
        "step_ms": step,
        "kernels_per_step": len(kernels) / steps,
        "ms_per_step": ordered,
        "heaviest_kernels": [
            {"kernel": name[:160], "bucket": bucket_of(name), "ms_per_step": ms, "launches_per_step": count}
            for name, (ms, count) in heaviest
        ],
        "longest_gaps": [
            {"ms": gap / 1000, "after": before[:120], "before": after[:120]} for gap, before, after in longest
        ],
        "gaps_over_50us_ms_per_step": sum(gap for gap, _, _ in gaps if gap > 50) / 1000 / steps,
    }


def lora_products_ms(hidden: int, intermediate: int, kv: int, layers: int, tokens: int, rank: int, device) -> float:
    """Forward and backward of a rank-``rank`` adapter on each of a layer's seven projections, for ``layers`` layers
    and ``tokens`` tokens, under bf16 autocast with float32 adapter weights (as ``lora.compute: base-dtype``):
    milliseconds of GPU kernel time (the casts and the input gradients' additions included)."""
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)]
    shapes += [(hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    inputs = {n: torch.randn(tokens, n, device=device, dtype=torch.bfloat16, requires_grad=True) for n, _ in shapes}
    adapters = [
        (
            torch.randn(rank, n, device=device, requires_grad=True),
            torch.randn(m, rank, device=device, requires_grad=True),
        )
        for n, m in shapes
    ]

    def once() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            total = 0
            for (n, _), (a, b) in zip(shapes, adapters, strict=True):
                total = total + ((inputs[n] @ a.t()) @ b.t()).float().mean()
        total.backward()

    for _ in range(2):
        once()
    torch.cuda.synchronize(device)
    # the kernels' own time, not the wall clock: run eagerly, one small product after another, the host's
    # launches would be what is timed, and inside the step they run from CUDA graphs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(layers):
            once()
        torch.cuda.synchronize(device)
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.time_range.end - e.time_range.start for e in profiler.events() if e.device_type == cuda) / 1000


class StepProfile(L.Callback):
    """Trace ``steps`` training steps after ``skip`` (compilation and warm-up), then write the breakdown.

    Args:
        out: The JSON file to write.
        skip: Training batches before the traced ones.
        steps: Traced batches.
    """

    def __init__(self, out: str = "step-profile.json", skip: int = 6, steps: int = 3) -> None:
        self.out, self.skip, self.steps = out, skip, steps
        self.profiler = None
        self.started: float | None = None
        self.step_ms: list[float] = []
        self.tokens = 0
        self.shape: tuple[int, int] | None = None  # (rows, tokens) of a traced batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.skip and self.profiler is None:
            activity = "CUDA" if pl_module.device.type == "cuda" else "CPU"  # a CPU run: its operators (smoke test)
            self.profiler = torch.profiler.profile(activities=[getattr(torch.profiler.ProfilerActivity, activity)])
            self.profiler.__enter__()
        if self.profiler is not None and len(self.step_ms) < self.steps:
            synchronize(pl_module.device)
            self.started = time.perf_counter()
            self.tokens += int((batch["labels"] != -100).sum())
            self.shape = tuple(batch["input_ids"].shape)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.started is None:
            return
        synchronize(pl_module.device)
        self.step_ms.append(1000 * (time.perf_counter() - self.started))
        self.started = None
        if len(self.step_ms) == self.steps:
            self.profiler.__exit__(None, None, None)
            self._write(trainer, pl_module)

    def _write(self, trainer, pl_module) -> None:
        device_type = (
            torch.autograd.DeviceType.CUDA if pl_module.device.type == "cuda" else torch.autograd.DeviceType.CPU
        )
        kernels = [
            (event.name, event.time_range.start, event.time_range.end)
            for event in self.profiler.events()
            if event.device_type == device_type
        ]
        result = breakdown(kernels, self.step_ms)
        config = pl_module.model_config
        rows, tokens = self.shape
        lora = pl_module.spec.lora
        if lora is not None and pl_module.device.type == "cuda":
            kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
            result["lora_products_ms"] = lora_products_ms(
                config.hidden_size,
                config.intermediate_size,
                kv,
                config.num_hidden_layers,
                rows * tokens,
                lora.r,
                pl_module.device,
            )
        result["scored_tokens_per_s"] = self.tokens / (sum(self.step_ms) / 1000)
        result["plan"] = pl_module.plan.choices() if pl_module.plan is not None else None
        result["gpu"] = torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda" else "cpu"
        atomic_write_json(Path(self.out), result)
        lines = [f"step {result['step_ms']:.1f} ms, {result['kernels_per_step']:.0f} kernels a step:"]
        lines += [
            f"  {name:<24} {ms:8.1f} ms  {ms / result['step_ms']:6.1%}" for name, ms in result["ms_per_step"].items()
        ]
        if "lora_products_ms" in result:
            lines.append(f"  LoRA products alone, timed apart: {result['lora_products_ms']:.1f} ms of kernels a step")
        lines.append(f"  gaps over 50 us: {result['gaps_over_50us_ms_per_step']:.1f} ms a step; heaviest kernels:")
        lines += [
            f"    {k['ms_per_step']:7.2f} ms {k['launches_per_step']:6.0f}x  {k['kernel'][:100]}"
            for k in result["heaviest_kernels"][:12]
        ]
        lines.append("  longest gaps (after -> before):")
        gaps = result["longest_gaps"][:12]
        lines += [f"    {g['ms']:6.2f} ms  {g['after'][:60]} -> {g['before'][:60]}" for g in gaps]
        print("\n".join(lines), flush=True)
        print(json.dumps(result, default=str)[:1000], flush=True)
