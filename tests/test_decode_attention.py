"""The decode step's attention kernel, run by Triton's interpreter on a CPU: SDPA's output for one query over a
masked static cache, in one chunk of positions or several, and the same decode step logits."""

from __future__ import annotations

import pytest
import torch

from helpers import count_calls, decode_step_logits

pytest.importorskip("triton", reason="the kernel's CPU check runs in Triton's interpreter")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("positions,filled", [(200, 137), (600, 555), (64, 1)])  # one chunk, three, one position
def test_decode_attention_gives_sdpa_output(dtype, positions, filled):
    from lightning_modules.decode_attention import decode_attention  # noqa: F401  (registers the operator)

    generator = torch.Generator().manual_seed(positions)
    kv_heads, groups, dim = 2, 4, 32
    query = torch.randn(kv_heads * groups, dim, generator=generator).to(dtype)
    key, value = torch.randn(2, kv_heads, positions, dim, generator=generator).to(dtype)
    mask = torch.arange(positions) < filled
    got = torch.ops.smarter.decode_attention(query, key, value, mask, dim**-0.5).float()
    want = torch.nn.functional.scaled_dot_product_attention(
        query.float().view(1, kv_heads, groups, dim),
        key.float()[None],
        value.float()[None],
        attn_mask=mask.view(1, 1, 1, positions),
        scale=dim**-0.5,
    ).view(kv_heads * groups, dim)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).norm() / want.norm() < 1e-2  # 16-bit output rounding


def test_the_routed_bf16_decode_step_takes_the_attention_kernel_and_gives_the_library_logits(monkeypatch):
    from lightning_modules import ModelSpec, decode_attention, load_causal_lm

    launches = count_calls(monkeypatch, decode_attention, "_kernels")
    torch.manual_seed(0)
    spec = ModelSpec(source="tiny", dtype="bfloat16", preset_overrides={"vocab_size": 1024})  # a light LM head
    model = load_causal_lm(spec, torch.device("cpu")).eval()
    prompt = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    library = decode_step_logits(model, prompt, triton_matvec=False)
    assert launches == []
    routed = decode_step_logits(model, prompt, triton_matvec=True)
    assert len(launches) == model.config.num_hidden_layers  # once a layer, in the step only
    assert (routed - library).norm() / library.norm() < 2e-2
