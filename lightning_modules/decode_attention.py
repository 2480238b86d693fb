"""One query token's attention over a static key/value cache, in Triton (the compiled decode step's attention).

A 7B decode step spends a small but measurable share of its time in attention (cuDNN's kernel per layer and the
copies that feed it; BENCHMARKS.md), for 4 query heads x 8 key/value heads x a few hundred cached positions:
work of about a microsecond. Here each program takes one key/value head's group of query heads (padded to 16 rows for
the tensor cores) over a chunk of ``CHUNK`` cached positions with an online softmax; with more than one chunk,
a second kernel combines the chunks' partial results. Positions where ``mask`` is False are left out (the static
cache's unwritten tail, and anything after the query).

``decode_attention(query, key, value, mask, scale)``: ``query`` ``(kv_heads * groups, dim)``, ``key``/``value``
``(kv_heads, positions, dim)`` (contiguous), ``mask`` ``(positions,)`` bool; returns ``(kv_heads * groups, dim)``.
On a CPU (tests) Triton's interpreter runs it when ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

CHUNK = 256  # cached positions per program
BLOCK_N = 64  # positions per loop step


@functools.cache
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, positions, scale, splits,
        GROUPS: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, CHUNK_: tl.constexpr,
        SINGLE: tl.constexpr, WIDEN: tl.constexpr,
    ):  # fmt: skip
        head = tl.program_id(0)  # key/value head
        split = tl.program_id(1)
        g = tl.arange(0, GPAD)
        d = tl.arange(0, D)
        g_ok = g < GROUPS
        q = tl.load(q_ptr + (head * GROUPS + g)[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0)
        if WIDEN:  # Triton's interpreter multiplies bfloat16 wrongly in tl.dot: float32 there
            q = q.to(tl.float32)
        m = tl.full((GPAD,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((GPAD,), dtype=tl.float32)
        acc = tl.zeros((GPAD, D), dtype=tl.float32)
        base = head.to(tl.int64) * positions * D
        for offset in range(0, CHUNK_, BLOCK):
            n = split * CHUNK_ + offset + tl.arange(0, BLOCK)
            n_ok = n < positions
            k = tl.load(k_ptr + base + n[:, None] * D + d[None, :], mask=n_ok[:, None], other=0.0)
            if WIDEN:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale  # (GPAD, BLOCK) in float32
            keep = (tl.load(mask_ptr + n, mask=n_ok, other=0) != 0) & n_ok
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept yet stays empty
            alpha = tl.exp(m - shift)
            p = tl.exp(s - shift[:, None])
            v = tl.load(v_ptr + base + n[:, None] * D + d[None, :], mask=n_ok[:, None], other=0.0)
            if WIDEN:
                v = v.to(tl.float32)
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        rows = head * GROUPS + g
        if SINGLE:
            out = acc / total[:, None]
            tl.store(out_ptr + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
        else:  # partial results: (query head, split) -> [m, l, acc[0..D)]
            slot = (rows.to(tl.int64) * splits + split) * (D + 2)
            tl.store(part_ptr + slot, m, mask=g_ok)
            tl.store(part_ptr + slot + 1, total, mask=g_ok)
            tl.store(part_ptr + slot[:, None] + 2 + d[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def combine_kernel(part_ptr, out_ptr, splits, D: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)  # query head
        i = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        i_ok = i < splits
        slot = (row.to(tl.int64) * splits + i) * (D + 2)
        m = tl.load(part_ptr + slot, mask=i_ok, other=float("-inf"))
        total = tl.load(part_ptr + slot + 1, mask=i_ok, other=0.0)
        acc = tl.load(part_ptr + slot[:, None] + 2 + d[None, :], mask=i_ok[:, None], other=0.0)
        top = tl.max(m, axis=0)
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))

    return chunk_attention_kernel, combine_kernel


@torch.library.custom_op("smarter::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of ``query`` ``(heads, dim)`` over ``key``/``value`` ``(kv_heads, positions, dim)`` where
    ``mask`` ``(positions,)`` is True; query head h reads key/value head h // (heads / kv_heads)."""
    import triton

    heads, dim = query.shape
    kv_heads, positions, _ = key.shape
    groups = heads // kv_heads
    splits = triton.cdiv(positions, CHUNK)
    out = torch.empty_like(query)
    chunk_kernel, combine = _kernels()
    single = splits == 1
    part = (
        query.new_empty(0, dtype=torch.float32)
        if single
        else query.new_empty(heads * splits * (dim + 2), dtype=torch.float32)
    )
    chunk_kernel[(kv_heads, splits)](
        query, key, value, mask, out, part, positions, scale, splits,
        GROUPS=groups, GPAD=max(16, triton.next_power_of_2(groups)), D=dim, BLOCK=BLOCK_N, CHUNK_=CHUNK,
        SINGLE=single, WIDEN=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4,
    )  # fmt: skip
    if not single:
        combine[(heads,)](part, out, splits, D=dim, SPLITS=triton.next_power_of_2(splits), num_warps=4)
    return out


@decode_attention.register_fake
def _(query, key, value, mask, scale):
    return torch.empty_like(query)


def decode_attention_applies(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """The kernel's shapes: batch 1, one query, a power-of-two head size of 16-256, a boolean mask over the
    cache's positions shared by every head (or none), 16-bit tensors."""
    dim = query.shape[-1]
    return (
        query.shape[0] == 1
        and query.shape[2] == 1
        and dim in (16, 32, 64, 128, 256)
        and query.dtype in (torch.bfloat16, torch.float16)
        and key.dtype == query.dtype
        and (mask is None or (mask.dtype == torch.bool and mask.shape == (1, 1, 1, key.shape[2])))
    )
