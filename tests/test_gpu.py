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


def _gpu_trainer(**kwargs) -> L.Trainer:
    quiet = {"logger": False, "enable_progress_bar": False, "enable_checkpointing": False}
    return L.Trainer(accelerator="gpu", devices=1, **{**quiet, **kwargs})


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
        source="tiny", quantization="nf4", lora=LoraSettings(r=4, alpha=8), activation_checkpointing="every-layer"
    )
    trainer = _gpu_trainer(max_steps=3, limit_val_batches=2, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=TreasureIslandDataModule(block_size=128, batch_size=2))
    assert trainer.global_step == 3
    assert all("lora_" in n for n, p in module.model.named_parameters() if p.requires_grad)


def test_trace_on_gpu_names_cuda_kernels(tmp_path, book_path):
    trace = KernelTraceCallback(wait=0, warmup=1, active=2, stages=["val"], output_dir=str(tmp_path))
    trainer = L.Trainer(
        accelerator="gpu", devices=1, limit_val_batches=3, logger=False, enable_progress_bar=False, callbacks=[trace]
    )
    # Liger's Triton kernels run under no dispatcher operator, so the operator totals would not cover them
    trainer.validate(
        MistralModule(source="tiny", quantization="nf4", kernels="off"),
        datamodule=TreasureIslandDataModule(block_size=128),
    )
    (summary,) = trace.summaries
    assert summary["device_kind"] == "cuda"
    names = " ".join(k["name"] for k in summary["kernels"]).lower()
    assert "gemm" in names or "gemv" in names or "kernel" in names
    totals = summary["totals"]
    assert totals["operator_self_device_ms"] == pytest.approx(totals["device_time_in_steps_ms"], rel=0.05)


def _fit_tiny_on_gpu(accumulate: int = 1, **spec) -> tuple[list[float], float]:
    losses: list[float] = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    L.seed_everything(0)
    module = MistralModule(source="tiny", quantization="nf4", lora=LoraSettings(r=8, alpha=16, dropout=0.0), **spec)
    trainer = _gpu_trainer(
        max_steps=20,
        limit_val_batches=4,
        val_check_interval=20 * accumulate,
        callbacks=[Recorder()],
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, datamodule=TreasureIslandDataModule(block_size=128, batch_size=4))
    return losses, float(trainer.callback_metrics["val/ppl"])


FAST_PATHS = {  # qlora-fast's, qlora-lean's and qlora-offload's ways through the same steps
    "layers": {"compile": "layers"},
    "layers-cudagraphs": {"compile": "layers-cudagraphs"},
    "offload": {"compile": "layers", "activation_checkpointing": "offload", "keep_last_layers": 0},
}


@pytest.mark.parametrize("path", list(FAST_PATHS))
def test_the_fast_qlora_path_computes_the_plain_paths_losses_on_gpu(path, book_path):
    plain, plain_ppl = _fit_tiny_on_gpu(kernels="off", loss="logits", compile="off")
    fast, fast_ppl = _fit_tiny_on_gpu(kernels="auto", loss="auto", **FAST_PATHS[path])
    assert len(plain) == len(fast) == 20
    for step, (a, b) in enumerate(zip(plain, fast, strict=True), start=1):
        assert b == pytest.approx(a, rel=1e-2), step
    assert fast_ppl == pytest.approx(plain_ppl, rel=1e-3)


def test_cuda_graph_layers_accumulate_gradients_as_the_plain_path_does_on_gpu(book_path):
    """Two batches an optimizer step: the second replay of each layer's graph must not overwrite the
    first batch's gradients (it did: "accessing tensor output of CUDAGraphs that has been overwritten")."""
    plain, plain_ppl = _fit_tiny_on_gpu(accumulate=2, kernels="off", loss="logits", compile="off")
    fast, fast_ppl = _fit_tiny_on_gpu(accumulate=2, kernels="auto", loss="auto", compile="layers-cudagraphs")
    assert len(plain) == len(fast) == 40
    for batch, (a, b) in enumerate(zip(plain, fast, strict=True), start=1):
        assert b == pytest.approx(a, rel=1e-2), batch
    assert fast_ppl == pytest.approx(plain_ppl, rel=1e-3)


@pytest.mark.parametrize("triton_matvec", [False, True])
def test_the_compiled_static_decoder_gives_the_eager_logits_on_gpu(triton_matvec):
    from lightning_modules.generation import StaticCacheDecoder

    torch._dynamo.reset()
    model = load_causal_lm(ModelSpec(source="tiny"), "cuda").eval()
    prompt = _ids()[:1, :20]
    decoder = StaticCacheDecoder(model, max_cache_len=128, compiled=True, triton_matvec=triton_matvec)
    _assert_steps_give_the_full_forwards_logits(decoder, model, prompt, steps=6)


def _assert_steps_give_the_full_forwards_logits(decoder, model, prompt: torch.Tensor, steps: int) -> None:
    """Greedy steps of ``decoder`` after reading ``prompt``: each step's logits against the model's full
    forward over the prompt and the tokens so far."""
    with torch.inference_mode():
        token = decoder.prefill(prompt).argmax(-1, keepdim=True)
        for step in range(steps):
            position = torch.tensor([prompt.shape[1] + step], device="cuda")
            compiled = decoder.step(token, position).float()
            full = model(input_ids=torch.cat([prompt, token], dim=1)).logits[:, -1].float()
            assert (compiled - full).norm() / full.norm() < 2e-2, step
            prompt = torch.cat([prompt, token], dim=1)
            token = compiled.argmax(-1, keepdim=True)


def test_prompts_of_several_lengths_read_by_graphs_give_the_eager_reads_logits_on_gpu():
    """Each prompt length gets its own prefill graph (sharing one memory pool) up to the cap, after which
    lengths are read eagerly; either way the read and the next step match an uncompiled decoder's."""
    from lightning_modules.generation import StaticCacheDecoder

    torch._dynamo.reset()
    model = load_causal_lm(ModelSpec(source="tiny", dtype="float32"), "cuda").eval()
    decoder = StaticCacheDecoder(model, max_cache_len=128, compiled=True)
    decoder.PREFILL_GRAPHS = 2
    eager = StaticCacheDecoder(model, max_cache_len=128, compiled=False)
    ids = torch.randint(3, 32000, (1, 80), device="cuda")
    with torch.inference_mode():
        for length in (5, 40, 70, 6, 40):
            prompt = ids[:, :length]
            read, expected = decoder.prefill(prompt).float(), eager.prefill(prompt).float()
            assert (read - expected).norm() / expected.norm() < 1e-3, length
            token, position = expected.argmax(-1, keepdim=True), torch.tensor([length], device="cuda")
            step, expected_step = decoder.step(token, position).float(), eager.step(token, position).float()
            assert (step - expected_step).norm() / expected_step.norm() < 1e-3, length
    assert sorted(decoder._prefill_graphs) == [32, 64]  # 70 came third: read eagerly


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_the_four_bit_kernel_compiles_and_gives_the_dequantized_product_on_gpu(nested, x_dtype):
    import bitsandbytes.functional as bnb_functional

    from lightning_modules.matvec_kernels import four_bit_operands

    torch.manual_seed(0)
    for n, k in ((4096, 4096), (1024, 14336), (40, 320)):
        packed, state = bnb_functional.quantize_4bit(
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16), quant_type="nf4", compress_statistics=nested
        )
        x = torch.randn(k, device="cuda", dtype=x_dtype)
        got = torch.ops.smarter.four_bit_matvec(x, **four_bit_operands(packed, state)).float()
        want = bnb_functional.dequantize_4bit(packed, state).float() @ x.float()
        assert (got - want).norm() / want.norm() < 1e-2, (n, k)


def test_the_compiled_nf4_decoder_with_the_four_bit_kernel_gives_the_eager_logits_on_gpu():
    from lightning_modules.generation import StaticCacheDecoder

    torch._dynamo.reset()
    model = load_causal_lm(ModelSpec(source="tiny", quantization="nf4"), "cuda").eval()
    prompt = _ids()[:1, :20]
    decoder = StaticCacheDecoder(model, max_cache_len=128, compiled=True, triton_matvec=True, four_bit_matvec=True)
    _assert_steps_give_the_full_forwards_logits(decoder, model, prompt, steps=4)


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@needs_two_gpus
@pytest.mark.parametrize("strategy", ["ddp", "fsdp-qlora", "ddp-accumulating-graphs"])
def test_qlora_on_two_gpus_trains_checkpoints_once_and_exports_the_adapter(strategy, tmp_path, book_path):
    """The tiny preset, nf4 QLoRA, on 2 GPUs: DDP, FSDP with the 4-bit weights in bf16 containers, and
    DDP accumulating two batches a step through CUDA-graph layers (which failed, in DDP's reducer and in
    the graphs, before the static graph and the gradients were set up for it)."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    lean = str(REPO_ROOT / "configs/finetune/qlora-lean.yaml")
    model = ["--model.source", "tiny", "--model.compile", "off"]
    if strategy == "fsdp-qlora":
        model += ["--model.quant_storage", "bfloat16"]
    config, steps = strategy, ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4"]
    if strategy == "ddp-accumulating-graphs":
        config = "ddp"
        model = ["--model.source", "tiny", "--model.compile", "layers-cudagraphs"]
        model += ["--model.activation_checkpointing", "off"]
        steps = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "8"]
        steps += ["--trainer.accumulate_grad_batches", "2"]
    data = ["--data.block_size", "128", "--data.eval_stride", "128"]
    args = ["fit", "-c", lean, "-c", str(REPO_ROOT / f"configs/distributed/{config}.yaml"), *model, *data]
    args += [*steps, "--trainer.devices", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "smarter.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # DDP built on the compute stream: no gradient crosses to another stream to be accumulated
    assert "AccumulateGrad node's stream does not match" not in result.stderr
    run = next((tmp_path / "runs").rglob("version_*"))
    assert len(list((run / "checkpoints").glob("*.ckpt"))) >= 1
    # what the 2 processes computed equals what one GPU computes from the checkpoint: a scrambled base
    # (4-bit weights cast by a precision plugin) or lost rows would show here
    from helpers import scalars

    two_gpu_ppl = scalars(run)["val/ppl"][-1][1]  # after step 4, the weights last.ckpt holds
    checkpoint = next((run / "checkpoints").glob("last*.ckpt"))
    one = ["validate", "-c", lean, *model, *data, "--ckpt_path", str(checkpoint), "--trainer.devices", "1"]
    if strategy == "fsdp-qlora":
        one += ["--trainer.precision", "bf16-true"]
    (tmp_path / "one").mkdir()
    single = subprocess.run(
        [sys.executable, "-m", "smarter.cli", *one], cwd=tmp_path / "one", capture_output=True, text=True, timeout=600
    )
    assert single.returncode == 0, single.stderr[-4000:]
    (one_gpu_ppl,) = [v for _, v in scalars(tmp_path / "one" / "runs")["val/ppl"]]
    assert two_gpu_ppl == pytest.approx(one_gpu_ppl, rel=1e-3)
    (adapter,) = (run / "export").glob("adapter")
    from peft import PeftModel

    base = load_causal_lm(ModelSpec(source="tiny", quantization="nf4"), "cuda")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = PeftModel.from_pretrained(base, adapter).eval()
    # every trained weight came back: none missing (PEFT warns and keeps the untrained one), and LoRA's B
    # matrices, zero when built, hold what the 4 steps taught them
    assert not [str(w.message)[:200] for w in caught if "missing adapter keys" in str(w.message)]
    b_norms = [float(p.norm()) for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert b_norms and min(b_norms) > 0
    with torch.no_grad():
        assert torch.isfinite(reloaded(_ids()).logits).all()


@needs_gpu
def test_offloaded_checkpointing_on_a_gpu_gives_the_gradients_of_no_checkpointing():
    """Each layer's input goes to pinned host memory on a side stream and comes back for its recomputation."""
    from test_module import _offload_step

    loss, grads = _offload_step("off", "cuda", "bfloat16", "base-dtype")  # adapters under autocast, as on a GPU
    offloaded_loss, offloaded_grads = _offload_step("offload", "cuda", "bfloat16", "base-dtype")
    assert offloaded_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(offloaded_grads[name], grad, rtol=2e-3, atol=1e-5)
