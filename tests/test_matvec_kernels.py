"""The decoder's Triton matrix-vector kernel, run by Triton's interpreter on a CPU: the products torch
computes, taken only for one-row inputs inside the decoder's step, and the same decode step logits."""

from __future__ import annotations

import pytest
import torch

from helpers import count_calls, decode_step_logits

pytest.importorskip("triton", reason="the kernel's CPU check runs in Triton's interpreter")


@pytest.fixture
def interpreted(monkeypatch):
    """The kernel (in Triton's interpreter without a GPU: conftest sets it) and a count of its launches."""
    from lightning_modules import matvec_kernels

    launches = count_calls(monkeypatch, matvec_kernels, "_kernel")
    monkeypatch.setitem(matvec_kernels.LAUNCH, "rows", 64)  # fewer programs: the interpreter runs each in numpy
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_matvec_kernel_gives_torchs_product(interpreted, dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(100, 300, generator=generator).to(dtype)  # neither size a multiple of a tile
    x = torch.randn(300, generator=generator).to(dtype)
    got = torch.ops.smarter.dense_matvec(x, weight)
    want = weight.float() @ x.float()
    assert got.dtype == dtype and got.shape == (100,)
    assert (got.float() - want).norm() / want.norm() < (1e-6 if dtype == torch.float32 else 1e-2)
    assert interpreted == [1]


def test_the_routed_decode_step_gives_the_library_steps_logits(interpreted):
    from lightning_modules import LoraSettings, ModelSpec, load_causal_lm
    from lightning_modules.matvec_kernels import use_triton_matvec

    spec = ModelSpec(source="tiny", dtype="float32", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    model = load_causal_lm(spec, torch.device("cpu")).eval()
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # adapters that change the output
            torch.nn.init.normal_(weight, std=0.05)
    prompt = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    token = prompt[:, -1:]
    library = decode_step_logits(model, prompt, triton_matvec=False)
    assert interpreted == []
    routed = decode_step_logits(model, prompt, triton_matvec=True)
    layers = model.config.num_hidden_layers
    # every projection's base weight and both LoRA matrices, and the LM head, once each; the prefill none
    assert use_triton_matvec(model) == len(interpreted) == layers * 7 * 3 + 1
    assert (routed - library).norm() / library.norm() < 1e-5
    with torch.inference_mode():  # outside the decoder's step the model runs as it always did
        model(input_ids=token)
    assert len(interpreted) == layers * 7 * 3 + 1


def test_auto_takes_the_kernel_for_the_compiled_decoder_on_a_gpu_only():
    from lightning_modules.generation import resolve_matvec

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_matvec("auto", "static-compiled", gpu) == "triton"
    assert resolve_matvec("auto", "static", gpu) == "library"  # the uncompiled static loop stays the library's
    assert resolve_matvec("auto", "dynamic", gpu) == "library"
    assert resolve_matvec("auto", "static-compiled", cpu) == "library"
    assert resolve_matvec("library", "static-compiled", gpu) == "library"
