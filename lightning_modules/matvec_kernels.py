"""Batch-1 decoding's matrix-vector products in Triton: one token's hidden state times a layer's weight.

A decode step multiplies one vector by every weight of the model, so its speed is how fast the weights
are read. For one row, the compiled step otherwise calls cuBLAS through inductor; the kernel here reads
each weight row once, multiplies in float32 and sums (on an H200 a 7B layer's seven products take
113.8 us against cuBLAS's 134.8, BENCHMARKS.md).

``use_triton_matvec(model)`` prepares every plain ``nn.Linear`` of a model (the LoRA matrices included;
bitsandbytes layers keep their own kernels) to take it for inputs of one row, inside
``triton_matvec_routing()`` only (the static decoder's step): more rows (prefill, training) and every
call outside go through torch as before. The kernel is a ``torch.library`` operator, so a compiled
decode step calls it inside its CUDA graph. On a CPU (tests) Triton's interpreter runs it when
``TRITON_INTERPRET=1``.

bitsandbytes' 4-bit one-row kernel (``gemm_4bit_simt``) is the larger part of an NF4 step (4.1 of
4.8 ms on the 7B: 0.86 TB/s). Two Triton NF4 kernels of this project with a code look-up per nibble
were slower still (0.37 and 0.59 TB/s) and are not shipped.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any

import torch

# launch shape: output rows per program, weight bytes per row per loop step, warps. Of 60 tried on each of the
# 7B's four weight shapes (H200, 8 layers' distinct weights replayed in a CUDA graph), this one was the
# fastest or within 0.3 us of it on every shape: a layer's seven products in 113.8 us (3.83 TB/s), where
# cuBLAS took 134.8 us and the earlier shape (4 rows, 1024 bytes, 8 warps) 127.8 us.
LAUNCH = {"rows": 2, "bytes": 4096, "warps": 2}
_ROUTING = {"on": False}  # routed layers take the kernels only inside ``triton_matvec_routing()``


@functools.cache
def triton_available() -> bool:
    """Triton is installed (it comes with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def dense_matvec_kernel(x_ptr, w_ptr, y_ptr, n, k, row_stride, ROWS: tl.constexpr, COLS: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = rows < n
        acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
        for start in range(0, k, COLS):
            cols = start + tl.arange(0, COLS)
            col_ok = cols < k
            w = tl.load(
                w_ptr + rows[:, None] * row_stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
            )
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    return dense_matvec_kernel


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.library.custom_op("smarter::dense_matvec", mutates_args=())
def dense_matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight @ x`` for one vector ``x`` ``(k,)`` and a 16- or 32-bit ``weight`` ``(n, k)`` (rows
    contiguous): ``(n,)`` in x's dtype, accumulated in float32."""
    n, k = weight.shape
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    rows, warps = LAUNCH["rows"], LAUNCH["warps"]
    cols = LAUNCH["bytes"] // weight.element_size()
    _kernel()[(triton_cdiv(n, rows),)](x, weight, y, n, k, weight.stride(0), ROWS=rows, COLS=cols, num_warps=warps)
    return y


@dense_matvec.register_fake
def _(x, weight):
    return x.new_empty(weight.shape[0])


# ---- 4-bit weights (bitsandbytes' NF4 / FP4 layout, blocks of 64) --------------------------------------------
# launch shape of the 4-bit kernel: output rows per program, quantization blocks (64 weights) per loop step, warps
FOUR_BIT_LAUNCH = {"rows": 4, "blocks": 2, "warps": 4}
_DECODE_ASM: dict[int, str] = {}  # code table id -> the inline assembly that decodes with it


def code_tables(code: list[float]) -> dict[str, tuple[int, int]]:
    """The 16 code values in fp16 as four 8-byte tables, each an (a, b) pair of int32: the high and the low
    bytes of entries 0-7 and of entries 8-15 (byte i of a table at bits 8i of a, 8(i-4) of b)."""
    import numpy as np

    bits = np.asarray(code, dtype=np.float16).view(np.uint16).astype(np.uint32)
    high, low = (bits >> 8) & 0xFF, bits & 0xFF

    def pack(four):
        return int(four[0] | (four[1] << 8) | (four[2] << 16) | (four[3] << 24))

    return {
        name: (pack(v[0:4]), pack(v[4:8]))
        for name, v in (("ha", high[:8]), ("hb", high[8:]), ("la", low[:8]), ("lb", low[8:]))
    }


def decode_asm(code: list[float]) -> str:
    """PTX that turns one int32 word of packed 4-bit weights (byte i: weight 2i in its high nibble, 2i+1 in
    its low one) into the 8 weights' code values as float32, in order, with byte permutes (``prmt``) of a
    register table: no memory look-up per weight. Per 4 weights: the low 3 bits of each nibble pick a
    byte of the entries 0-7 and 8-15 tables (high and low bytes of the fp16 codes), the nibble's top bit
    chooses between them (a byte mask made by ``prmt``'s sign mode), two more permutes pair the bytes
    into fp16 values, converted to float32."""
    tables = code_tables(code)
    group = """
    and.b32 sel, w, 0x7777;
    shr.b32 tmp, w, 3;
    and.b32 tmp, tmp, 0x1111;
    or.b32 tmp, tmp, 0x8888;
    prmt.b32 msk, signsrc, zero, tmp;
    prmt.b32 xa, ha0, ha1, sel;
    prmt.b32 xb, hb0, hb1, sel;
    lop3.b32 hh, xa, xb, msk, 0xD8;
    prmt.b32 xa, la0, la1, sel;
    prmt.b32 xb, lb0, lb1, sel;
    lop3.b32 ll, xa, xb, msk, 0xD8;
    prmt.b32 r0, ll, hh, 0x5140;
    prmt.b32 r1, ll, hh, 0x7362;
    mov.b32 {p0, p1}, r0;
    cvt.f32.f16 $W1, p0;
    cvt.f32.f16 $W0, p1;
    mov.b32 {p0, p1}, r1;
    cvt.f32.f16 $W3, p0;
    cvt.f32.f16 $W2, p1;
"""
    first = group.replace("$W", "$")  # weights 0-3 from the word's low 16 bits
    second = group
    for i in range(4):
        second = second.replace(f"$W{i}", f"${i + 4}")  # weights 4-7 from its high 16 bits
    constants = " ".join(f"mov.b32 {name}{i}, 0x{pair[i]:08X};" for name, pair in tables.items() for i in (0, 1))
    return (
        "{\n.reg .b32 w, sel, tmp, msk, xa, xb, hh, ll, r0, r1, signsrc, zero;\n"
        ".reg .b32 ha0, ha1, hb0, hb1, la0, la1, lb0, lb1;\n"
        ".reg .b16 p0, p1;\n"
        + constants
        + " mov.b32 signsrc, 0x00008000; mov.b32 zero, 0;\nmov.b32 w, $8;\n"
        + first
        + "shr.b32 w, $8, 16;\n"
        + second
        + "}"
    )


@functools.cache
def _four_bit_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def four_bit_matvec_kernel(
        x_ptr, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code16_ptr, offset, y_ptr, n, k,
        BLOCK2: tl.constexpr, NESTED: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr, ASM: tl.constexpr,
        LOOKUP: tl.constexpr,
    ):  # fmt: skip
        # tiles of (ROWS rows, NB blocks of 64 weights = 8 int32 words): one scale per (row, block), x read as
        # contiguous runs of 8 and split in registers
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = rows < n
        row_words = k // 8
        blocks_per_row = k // 64
        nb = tl.arange(0, NB)
        j = tl.arange(0, 8)
        acc = tl.zeros((ROWS, NB, 8), dtype=tl.float32)  # summed over words and blocks once, after the loop
        for first in range(0, blocks_per_row, NB):
            block = first + nb
            block_ok = block < blocks_per_row
            word = block[:, None] * 8 + j[None, :]  # (NB, 8) word offsets in a row
            ok3 = row_ok[:, None, None] & block_ok[None, :, None]
            wd = tl.load(words_ptr + rows[:, None, None] * row_words + word[None, :, :], mask=ok3, other=0)
            if LOOKUP:  # Triton's interpreter has no inline assembly: the same values by look-up
                w0 = tl.load(code16_ptr + ((wd >> 4) & 15))
                w1 = tl.load(code16_ptr + (wd & 15))
                w2 = tl.load(code16_ptr + ((wd >> 12) & 15))
                w3 = tl.load(code16_ptr + ((wd >> 8) & 15))
                w4 = tl.load(code16_ptr + ((wd >> 20) & 15))
                w5 = tl.load(code16_ptr + ((wd >> 16) & 15))
                w6 = tl.load(code16_ptr + ((wd >> 28) & 15))
                w7 = tl.load(code16_ptr + ((wd >> 24) & 15))
            else:
                w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                    ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r", [wd], dtype=(tl.float32,) * 8, is_pure=True, pack=1
                )
            xs = tl.load(x_ptr + word[:, :, None] * 8 + j[None, None, :], mask=block_ok[:, None, None], other=0.0)
            x_even, x_odd = tl.split(tl.reshape(xs.to(tl.float32), (NB, 8, 4, 2)))  # weights 0,2,4,6 / 1,3,5,7
            x04, x26 = tl.split(tl.reshape(x_even, (NB, 8, 2, 2)))
            x15, x37 = tl.split(tl.reshape(x_odd, (NB, 8, 2, 2)))
            x0, x4 = tl.split(x04)
            x2, x6 = tl.split(x26)
            x1, x5 = tl.split(x15)
            x3, x7 = tl.split(x37)
            products = w0 * x0[None] + w1 * x1[None] + w2 * x2[None] + w3 * x3[None]
            products += w4 * x4[None] + w5 * x5[None] + w6 * x6[None] + w7 * x7[None]
            index = rows[:, None] * blocks_per_row + block[None, :]
            ok2 = row_ok[:, None] & block_ok[None, :]
            if NESTED:
                q = tl.load(absmax_ptr + index, mask=ok2, other=0).to(tl.int32)
                scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + index // BLOCK2, mask=ok2, other=0.0) + offset
            else:
                scale = tl.load(absmax_ptr + index, mask=ok2, other=0.0)
            acc += products * scale[:, :, None]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    return four_bit_matvec_kernel


@torch.library.custom_op("smarter::four_bit_matvec", mutates_args=())
def four_bit_matvec(
    x: torch.Tensor,
    words: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    code16: torch.Tensor,
    offset: float,
    n: int,
    nested: bool,
    blocksize2: int,
    table: int,
) -> torch.Tensor:
    """``W @ x`` for one vector ``x`` ``(k,)`` and a 4-bit weight ``W`` ``(n, k)`` in bitsandbytes' layout
    (``words``: its packed bytes as int32, rows of k / 8 words; blocks of 64 weights with one ``absmax``
    each, itself 8-bit quantized when ``nested``); the codes are ``code16`` (float32 values of the fp16
    codes) and, on a GPU, the register table ``table`` of ``_DECODE_ASM``. ``(n,)`` in x's dtype."""
    k = x.shape[0]
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    rows, blocks, warps = FOUR_BIT_LAUNCH["rows"], FOUR_BIT_LAUNCH["blocks"], FOUR_BIT_LAUNCH["warps"]
    lookup = os.environ.get("TRITON_INTERPRET") == "1"
    _four_bit_kernel()[(triton_cdiv(n, rows),)](
        x, words, absmax, absmax2, code2, code16, offset, y, n, k,
        BLOCK2=blocksize2, NESTED=nested, ROWS=rows, NB=blocks, ASM=_DECODE_ASM[table], LOOKUP=lookup,
        num_warps=warps,
    )  # fmt: skip
    return y


@four_bit_matvec.register_fake
def _(x, words, absmax, absmax2, code2, code16, offset, n, nested, blocksize2, table):
    return x.new_empty(n)


def _four_bit_operands(layer: torch.nn.Module) -> dict[str, Any] | None:
    """The kernel's operands for a bitsandbytes 4-bit layer, or None where the kernel does not apply."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None or state.blocksize != 64 or len(state.shape) != 2 or state.shape[1] % 64:
        return None
    nested = bool(getattr(state, "nested", False))
    if nested and state.state2.blocksize < 1:
        return None
    code = state.code.float().tolist()
    table = next((key for key, text in _DECODE_ASM.items() if text == decode_asm(code)), len(_DECODE_ASM))
    _DECODE_ASM.setdefault(table, decode_asm(code))
    return dict(
        words=layer.weight.data.view(torch.uint8).reshape(-1).view(torch.int32),
        absmax=state.absmax,
        absmax2=state.state2.absmax if nested else state.absmax,
        code2=(state.state2.code if nested else state.code).float(),
        code16=state.code.to(torch.float16).float(),
        offset=float(state.offset) if nested else 0.0,
        n=state.shape[0],
        nested=nested,
        blocksize2=state.state2.blocksize if nested else 1,
        table=table,
    )


def _one_row_or_bitsandbytes(original, layer: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    operands = layer._smarter_four_bit
    one_row = _ROUTING["on"] and x.numel() == x.shape[-1] and not torch.is_grad_enabled()
    if not one_row or x.shape[-1] % 64:
        return original(x, *args, **kwargs)
    y = torch.ops.smarter.four_bit_matvec(x.reshape(-1), **operands)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.view(*x.shape[:-1], operands["n"])


def use_triton_matvec(model: torch.nn.Module, four_bit: bool = False) -> int:
    """Prepare every plain ``nn.Linear`` of ``model`` with floating-point weights (and with ``four_bit`` every
    bitsandbytes 4-bit layer of blocks of 64) to send one-row inputs to the Triton kernels inside
    ``triton_matvec_routing()``; returns how many layers are prepared."""
    prepared = 0
    for layer in model.modules():
        if type(layer) is torch.nn.Linear and layer.weight.dtype.is_floating_point:
            if not getattr(layer, "_smarter_matvec", False):
                layer.forward = functools.partial(_one_row_or_torch, layer.forward, layer)
                layer._smarter_matvec = True
            prepared += 1
        elif four_bit and type(layer).__name__ == "Linear4bit":
            if getattr(layer, "_smarter_four_bit", None) is None:
                operands = _four_bit_operands(layer)
                if operands is None:
                    continue  # other block sizes keep bitsandbytes' kernel
                layer._smarter_four_bit = operands
                layer.forward = functools.partial(_one_row_or_bitsandbytes, layer.forward, layer)
            prepared += 1
    return prepared


def triton_matvec_routed() -> bool:
    """Inside ``triton_matvec_routing()``."""
    return _ROUTING["on"]


@contextlib.contextmanager
def switched_on(switch: dict[str, Any]):
    """Inside, ``switch["on"]`` is True; after, as it was."""
    previous = switch["on"]
    switch["on"] = True
    try:
        yield
    finally:
        switch["on"] = previous


def triton_matvec_routing():
    """Inside, one-row inputs of layers prepared by ``use_triton_matvec`` take the Triton kernel."""
    return switched_on(_ROUTING)


def _one_row_or_torch(original, layer: torch.nn.Linear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    weight = layer.weight
    one_row = _ROUTING["on"] and x.numel() == x.shape[-1] and not torch.is_grad_enabled()
    if not one_row or x.dtype != weight.dtype or weight.stride(1) != 1:
        return original(x, *args, **kwargs)
    y = torch.ops.smarter.dense_matvec(x.reshape(-1), weight)
    if layer.bias is not None:
        y = y + layer.bias
    return y.view(*x.shape[:-1], weight.shape[0])
