"""GPU-only checks (skipped without CUDA): quantized kernels, SDPA on GPU, CUDA kernels in traces."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks import KernelTraceCallback
from conftest import needs_gpu
from datamodules.treasure_island import TreasureIslandDataModule
from lightning_modules import LoraSettings, MistralModule, ModelSpec, load_causal_lm

pytestmark = [pytest.mark.gpu, needs_gpu]


def _ids() -> torch.Tensor:
    return torch.randint(3, 32000, (2, 64), device="cuda")


@pytest.mark.parametrize("quantization", ["nf4", "nf4-dq", "int8"])
def test_quantized_tiny_model_on_gpu_stays_close_to_the_reference(quantization):
    dtype = "float16" if quantization == "int8" else "bfloat16"
    reference = load_causal_lm(ModelSpec(source="tiny", dtype=dtype), "cuda").eval()
    quantized = load_causal_lm(ModelSpec(source="tiny", dtype=dtype, quantization=quantization), "cuda").eval()
    ids = _ids()
    with torch.no_grad():
        ref, out = reference(ids).logits.float(), quantized(ids).logits.float()
    error = (out - ref).norm() / ref.norm()
    assert 0 < error < 0.3


def test_sdpa_and_eager_agree_on_gpu_in_bf16():
    eager = load_causal_lm(ModelSpec(source="tiny", attention="eager"), "cuda").eval()
    sdpa = load_causal_lm(ModelSpec(source="tiny", attention="sdpa"), "cuda").eval()
    ids = _ids()
    with torch.no_grad():
        a, b = eager(ids).logits.float(), sdpa(ids).logits.float()
    assert (a - b).norm() / a.norm() < 2e-2  # bf16 rounding, different kernels


def test_qlora_step_on_gpu_trains_only_adapters(tmp_path, book_path):
    module = MistralModule(
        source="tiny", quantization="nf4", lora=LoraSettings(r=4, alpha=8), gradient_checkpointing=True
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=3,
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=TreasureIslandDataModule(block_size=128, batch_size=2))
    assert trainer.global_step == 3
    assert all("lora_" in n for n, p in module.model.named_parameters() if p.requires_grad)


def test_trace_on_gpu_names_cuda_kernels(tmp_path, book_path):
    trace = KernelTraceCallback(wait=0, warmup=1, active=2, stages=["val"], output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="gpu", devices=1, limit_val_batches=3, logger=False, enable_progress_bar=False, callbacks=[trace]
    )
    trainer.validate(
        MistralModule(source="tiny", quantization="nf4"), datamodule=TreasureIslandDataModule(block_size=128)
    )
    (summary,) = trace.summaries
    assert summary["device_kind"] == "cuda"
    names = " ".join(k["name"] for k in summary["kernels"]).lower()
    assert "gemm" in names or "gemv" in names or "kernel" in names
    totals = summary["totals"]
    assert totals["operator_self_device_ms"] == pytest.approx(totals["device_time_in_steps_ms"], rel=0.05)
