"""Batch-1 decoding's matrix-vector products in Triton: one token's hidden state times a layer's weight.

A decode step multiplies one vector by every weight of the model, so its speed is how fast the weights
are read. For one row, the compiled step otherwise calls cuBLAS through inductor; the kernel here reads
each weight row once, multiplies in float32 and sums (faster than cuBLAS on a 7B layer's products:
BENCHMARKS.md).

``use_triton_matvec(model)`` prepares every plain ``nn.Linear`` of a model (the LoRA matrices included)
to take it for inputs of one row, while that model's ``DecodeRouting`` is switched on (the static decoder's
step): more rows (prefill, training), other models and every call outside go through torch as before. The kernels are
``torch.library`` operators, so a compiled decode step calls them inside its CUDA graph. On a CPU
(tests) Triton's interpreter runs them when ``TRITON_INTERPRET=1``.

With ``four_bit=True`` bitsandbytes' 4-bit layers (NF4 or FP4, blocks of 64) take ``four_bit_matvec``,
whose inline assembly decodes each 32-bit word of eight codes in registers and sums with packed 16-bit
fused multiply-adds, faster than bitsandbytes' ``gemv_4bit`` (BENCHMARKS.md has the figures). The assembly is
NVIDIA's (PTX, bf16x2 arithmetic from compute capability 8.0); elsewhere (older or non-NVIDIA GPUs) the 4-bit
layers keep bitsandbytes' kernel. Three earlier designs, a code look-up per nibble and register decoding without
the packed sums, were slower than bitsandbytes and are not shipped (BENCHMARKS.md).
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
# fastest, or as fast as the fastest, on every shape (the sweep is in BENCHMARKS.md).
LAUNCH = {"rows": 2, "bytes": 4096, "warps": 2}


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
# launch shape of the 4-bit kernel: output rows per program, quantization blocks (64 weights) per loop step, warps;
# the best of 40 launches tried on an H200 (7B shapes, nf4, double quant; the sweep is in BENCHMARKS.md)
FOUR_BIT_LAUNCH = {"rows": 8, "blocks": 32, "warps": 8}


def code_tables(code: list[float], dtype: str = "float16") -> dict[str, tuple[int, int]]:
    """The 16 code values in ``dtype`` (``float16`` or ``bfloat16``) as four 8-byte tables, each an (a, b) pair
    of int32: the high and the low bytes of entries 0-7 and of entries 8-15 (byte i of a table at bits 8i of
    a, 8(i-4) of b)."""
    bits = torch.tensor(code, dtype=torch.float64).to(getattr(torch, dtype)).view(torch.int16).int() & 0xFFFF
    high, low = ((bits >> 8) & 0xFF).tolist(), (bits & 0xFF).tolist()

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
    first = _BYTE_DECODE + _TO_FLOAT.replace("$W", "$")  # weights 0-3 from the word's low 16 bits
    second = _BYTE_DECODE + _TO_FLOAT
    for i in range(4):
        second = second.replace(f"$W{i}", f"${i + 4}")  # weights 4-7 from its high 16 bits
    return _asm_preamble(code) + "mov.b32 w, $8;\n" + first + "shr.b32 w, $8, 16;\n" + second + "}"


# four weights' fp16 codes from 16 bits of ``w``: r0 holds weights 1 (low half) and 0, r1 weights 3 and 2
_BYTE_DECODE = """
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
"""
_TO_FLOAT = """
    mov.b32 {p0, p1}, r0;
    cvt.f32.f16 $W1, p0;
    cvt.f32.f16 $W0, p1;
    mov.b32 {p0, p1}, r1;
    cvt.f32.f16 $W3, p0;
    cvt.f32.f16 $W2, p1;
"""


def _asm_preamble(code: list[float], dtype: str = "float16") -> str:
    constants = " ".join(
        f"mov.b32 {name}{i}, 0x{pair[i]:08X};" for name, pair in code_tables(code, dtype).items() for i in (0, 1)
    )
    return (
        "{\n.reg .b32 w, sel, tmp, msk, xa, xb, hh, ll, r0, r1, signsrc, zero, xs;\n"
        ".reg .b32 ha0, ha1, hb0, hb1, la0, la1, lb0, lb1;\n"
        ".reg .b16 p0, p1;\n"
        ".reg .f32 c, xv, acc, lo, hi;\n" + constants + " mov.b32 signsrc, 0x00008000; mov.b32 zero, 0;\n"
    )


def dot_asm(code: list[float], x_dtype: str) -> str:
    """PTX for the dot product of one int32 word of 4-bit weights (``$1``; byte i: weight 2i in its high nibble,
    2i+1 in its low one) with the word's 8 x values (``$2``-``$5``: int32 pairs of 16-bit x, x 2i in the low
    half), into ``$0`` (float32). ``$6``-``$9`` hold the first words of the code tables (``dot_tables``; in
    registers, the second words are immediates here). Per 4 weights: the low 3 bits of each nibble pick a
    byte of the entries 0-7 and 8-15 tables (high and low bytes of the codes in x's dtype, ``bfloat16`` or
    ``float16``), the nibble's top bit chooses between them (a byte mask made by ``prmt``'s sign mode from
    the word and the word shifted by 4), and two more permutes pair the codes as x's pairs hold them.
    Packed fused multiply-adds in x's dtype sum the even and the odd weights' products (4 each, rounded
    at each step as a 16-bit sum is); ``$0`` is the float32 sum of the two."""
    tables = code_tables(code, x_dtype)
    pair_type, half_type = ("bf16x2", "bf16") if x_dtype == "bfloat16" else ("f16x2", "f16")
    text = (
        "{\n.reg .b32 sel, shifted, msk, xa, xb, hh, ll, r0, r1, sums, ha1, hb1, la1, lb1;\n"
        ".reg .b16 p0, p1;\n.reg .f32 lo, hi;\n"
        + " ".join(f"mov.b32 {name}1, 0x{tables[name][1]:08X};" for name in ("ha", "hb", "la", "lb"))
        + "\nmov.b32 sums, 0;\nshl.b32 shifted, $1, 4;\n"
    )
    for group, (pair_a, pair_b, sign_bytes) in enumerate((("$2", "$3", "0x9D8C"), ("$4", "$5", "0xBFAE"))):
        text += "and.b32 sel, $1, 0x7777;\n" if group == 0 else "shr.b32 sel, $1, 16;\nand.b32 sel, sel, 0x7777;\n"
        # byte j of msk: all ones where the nibble that picks byte j has its top bit set
        text += f"prmt.b32 msk, $1, shifted, {sign_bytes};\n"
        text += "prmt.b32 xa, $6, ha1, sel;\nprmt.b32 xb, $7, hb1, sel;\nlop3.b32 hh, xa, xb, msk, 0xD8;\n"
        text += "prmt.b32 xa, $8, la1, sel;\nprmt.b32 xb, $9, lb1, sel;\nlop3.b32 ll, xa, xb, msk, 0xD8;\n"
        # r0: weight 4g (low half) and 4g+1, r1: weights 4g+2 and 4g+3
        text += "prmt.b32 r0, ll, hh, 0x4051;\nprmt.b32 r1, ll, hh, 0x6273;\n"
        text += f"fma.rn.{pair_type} sums, r0, {pair_a}, sums;\nfma.rn.{pair_type} sums, r1, {pair_b}, sums;\n"
    text += f"mov.b32 {{p0, p1}}, sums;\ncvt.f32.{half_type} lo, p0;\ncvt.f32.{half_type} hi, p1;\n"
    return text + "add.f32 $0, lo, hi;\n}"


def dot_tables(code: list[float], x_dtype: str) -> list[int]:
    """``dot_asm``'s register operands ``$6``-``$9`` for ``code`` in ``x_dtype``, as signed int32 values."""
    tables = code_tables(code, x_dtype)
    return [
        value - (1 << 32) if value >= 1 << 31 else value for value in (tables[n][0] for n in ("ha", "hb", "la", "lb"))
    ]


@functools.cache
def _four_bit_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def four_bit_matvec_kernel(
        x_ptr, x32_ptr, tables_ptr, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code16_ptr, offset, y_ptr, n, k,
        hidden_zero, BLOCK2: tl.constexpr, NESTED: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr,
        ASM: tl.constexpr, LOOKUP: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        # tiles of (ROWS rows, NB blocks of 64 weights = 8 int32 words): each word's 8 products summed in
        # registers by the inline assembly (x read as 4 int32 pairs of 16-bit values), one scale per
        # (row, block)
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None, None]  # (ROWS, 1, 1)
        row_ok = tl.full((ROWS, 1, 1), 1, tl.int1) if EVEN else rows < n  # EVEN: whole tiles, no masks
        row_words = tl.multiple_of(k // 8, 8)  # k is a multiple of 64: rows start 32-byte aligned
        blocks_per_row = k // 64
        nb = tl.arange(0, NB)[None, :, None]  # (1, NB, 1)
        j = tl.arange(0, 8)[None, None, :]  # (1, 1, 8)
        # every operand is loaded in the tile's own shape (x and scales once per row of the tile: cached
        # re-reads), so that no value changes layout (through shared memory) inside the loop
        zero = tl.zeros((ROWS, NB, 8), dtype=tl.int32)
        acc = tl.zeros((ROWS, NB, 8), dtype=tl.float32)  # summed over words and blocks once, after the loop
        if not LOOKUP:
            # the code tables' register words, read at an address the compiler cannot prove the same in every
            # thread (hidden_zero is 0): held in ordinary registers, not copied from uniform ones at each use
            lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [zero], tl.int32, True, 1)
            table = tables_ptr + (lane & hidden_zero)
            t0 = tl.load(table)
            t1 = tl.load(table + 1)
            t2 = tl.load(table + 2)
            t3 = tl.load(table + 3)
        for first in range(0, blocks_per_row, NB):
            block = first + nb
            block_ok = tl.full((1, NB, 1), 1, tl.int1) if EVEN else block < blocks_per_row
            word = block * 8 + j + zero  # (ROWS, NB, 8) word offsets in a row
            ok = row_ok & block_ok
            wd = tl.load(words_ptr + rows * row_words + word, mask=ok, other=0)
            if LOOKUP:  # Triton's interpreter has no inline assembly: the same sums by look-up
                sums = tl.zeros((ROWS, NB, 8), dtype=tl.float32)
                for t in tl.static_range(8):  # weight t of a word: nibble 1 - t % 2 of byte t // 2
                    nibble = (wd >> (8 * (t // 2) + 4 * (1 - t % 2))) & 15
                    xt = tl.load(x_ptr + word * 8 + t, mask=block_ok, other=0.0).to(tl.float32)
                    sums += tl.load(code16_ptr + nibble) * xt
            else:
                pair = tl.arange(0, 4)[None, None, None, :]  # a word's 4 pairs of x, read as one 16-byte load
                xs = tl.load(x32_ptr + (word * 4)[:, :, :, None] + pair, mask=block_ok[:, :, :, None], other=0)
                x_even, x_odd = tl.split(tl.reshape(xs, (ROWS, NB, 8, 2, 2)))  # pairs 0, 2 / 1, 3
                x0, x2 = tl.split(x_even)
                x1, x3 = tl.split(x_odd)
                sums = tl.inline_asm_elementwise(
                    ASM, "=f,r,r,r,r,r,r,r,r,r", [wd, x0, x1, x2, x3, t0, t1, t2, t3],
                    dtype=tl.float32, is_pure=True, pack=1,
                )  # fmt: skip
            index = rows * blocks_per_row + block + zero
            if NESTED:
                q = tl.load(absmax_ptr + index, mask=ok, other=0).to(tl.int32)
                scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + index // BLOCK2, mask=ok, other=0.0) + offset
            else:
                scale = tl.load(absmax_ptr + index, mask=ok, other=0.0)
            acc += sums * scale
        y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (ROWS,)
        out_rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        tl.store(y_ptr + out_rows, y.to(y_ptr.dtype.element_ty), mask=out_rows < n)

    return four_bit_matvec_kernel


@functools.cache
def _dot_asm(code: tuple[float, ...], x_dtype: str) -> str:
    return dot_asm(list(code), x_dtype)


@torch.library.custom_op("smarter::four_bit_matvec", mutates_args=())
def four_bit_matvec(
    x: torch.Tensor,
    words: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    code16: torch.Tensor,
    tables: torch.Tensor,
    offset: float,
    n: int,
    nested: bool,
    blocksize2: int,
    code: list[float],
) -> torch.Tensor:
    """``W @ x`` for one vector ``x`` ``(k,)`` and a 4-bit weight ``W`` ``(n, k)`` in bitsandbytes' layout
    (``words``: its packed bytes as int32, rows of k / 8 words; blocks of 64 weights with one ``absmax``
    each, itself 8-bit quantized when ``nested``); the codes are ``code16`` (float32 values of the fp16
    codes) and, on a GPU, the assembly of ``code`` (its 16 values) with its register words ``tables`` (int32
    ``(2, 4)``: for bfloat16 and float16 x, ``dot_tables``); x is bfloat16 or float16. ``(n,)`` in x's dtype."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"four_bit_matvec takes bfloat16 or float16 x, not {x.dtype}")
    k = x.shape[0]
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    rows, blocks, warps = FOUR_BIT_LAUNCH["rows"], FOUR_BIT_LAUNCH["blocks"], FOUR_BIT_LAUNCH["warps"]
    lookup = os.environ.get("TRITON_INTERPRET") == "1"
    bf16 = x.dtype == torch.bfloat16
    even = n % rows == 0 and (k // 64) % blocks == 0
    _four_bit_kernel()[(triton_cdiv(n, rows),)](
        x, x.view(torch.int32), tables[0 if bf16 else 1], words, absmax, absmax2, code2, code16, offset, y, n, k, 0,
        BLOCK2=blocksize2, NESTED=nested, ROWS=rows, NB=blocks, ASM=_dot_asm(tuple(code), str(x.dtype)[6:]),
        LOOKUP=lookup, EVEN=even, num_warps=warps,
    )  # fmt: skip
    return y


@four_bit_matvec.register_fake
def _(x, words, absmax, absmax2, code2, code16, tables, offset, n, nested, blocksize2, code):
    return x.new_empty(n)


def four_bit_assembly_runs_on(device: torch.device) -> bool:
    """The 4-bit kernel's inline PTX compiles for ``device``: an NVIDIA GPU of compute capability 8.0 or
    later (packed bf16 arithmetic), or a CPU, where Triton's interpreter runs it (tests)."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def _table_words(code: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``dot_tables`` of ``code`` for bfloat16 and for float16 x: int32 ``(2, 4)`` on ``device``,
    one tensor shared by every layer with that code."""
    return torch.tensor(
        [dot_tables(list(code), "bfloat16"), dot_tables(list(code), "float16")], dtype=torch.int32, device=device
    )


def four_bit_operands(packed: torch.Tensor, state: Any) -> dict[str, Any] | None:
    """``four_bit_matvec``'s operands for bitsandbytes 4-bit weights (``packed``, its packed bytes in any
    storage dtype, and their ``QuantState``), or None where the kernel does not apply."""
    if state is None or state.blocksize != 64 or len(state.shape) != 2 or state.shape[1] % 64:
        return None
    if not four_bit_assembly_runs_on(state.absmax.device):
        return None
    nested = bool(getattr(state, "nested", False))
    if nested and state.state2.blocksize < 1:
        return None
    code = tuple(state.code.float().tolist())
    return dict(
        words=packed.view(torch.uint8).reshape(-1).view(torch.int32),
        absmax=state.absmax,
        absmax2=state.state2.absmax if nested else state.absmax,
        code2=(state.state2.code if nested else state.code).float(),
        code16=state.code.to(torch.float16).float(),
        tables=_table_words(code, state.absmax.device),
        offset=float(state.offset) if nested else 0.0,
        n=state.shape[0],
        nested=nested,
        blocksize2=state.state2.blocksize if nested else 1,
        code=list(code),
    )


def _one_row_or_bitsandbytes(
    original, layer: torch.nn.Module, routing: DecodeRouting, x: torch.Tensor, *args, **kwargs
) -> torch.Tensor:
    operands = layer._smarter_four_bit
    one_row = routing.routes_matvec and x.numel() == x.shape[-1] and not torch.is_grad_enabled()
    if not one_row or x.shape[-1] % 64 or x.dtype not in (torch.bfloat16, torch.float16):
        return original(x, *args, **kwargs)
    y = torch.ops.smarter.four_bit_matvec(x.reshape(-1).contiguous(), **operands)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.view(*x.shape[:-1], operands["n"])


def _is_bitsandbytes_four_bit(layer: torch.nn.Module) -> bool:
    """bitsandbytes' own 4-bit layer; not peft's LoRA wrapper around one (also named ``Linear4bit``, and showing
    its base's ``weight``), whose forward must keep adding the adapter's update."""
    cls = type(layer)
    return cls.__name__ == "Linear4bit" and cls.__module__.split(".")[0] == "bitsandbytes"


def use_triton_matvec(model: torch.nn.Module, four_bit: bool = True) -> int:
    """Prepare every plain ``nn.Linear`` of ``model`` with floating-point weights (and unless ``four_bit`` is
    False every bitsandbytes 4-bit layer of blocks of 64, on a device where ``four_bit_assembly_runs_on``) to
    send one-row inputs to the Triton kernels while the model's ``DecodeRouting`` is on; returns how many layers
    are prepared."""
    routing = decode_routing(model)
    routing.matvec = True
    prepared = 0
    for layer in model.modules():
        if type(layer) is torch.nn.Linear and layer.weight.dtype.is_floating_point:
            if not getattr(layer, "_smarter_matvec", False):
                layer.forward = functools.partial(_one_row_or_torch, layer.forward, layer, routing)
                layer._smarter_matvec = True
            prepared += 1
        elif four_bit and _is_bitsandbytes_four_bit(layer):
            if getattr(layer, "_smarter_four_bit", None) is None:
                operands = four_bit_operands(layer.weight.data, getattr(layer.weight, "quant_state", None))
                if operands is None:
                    continue  # other block sizes keep bitsandbytes' kernel
                layer._smarter_four_bit = operands
                layer.forward = functools.partial(_one_row_or_bitsandbytes, layer.forward, layer, routing)
            prepared += 1
    return prepared


class DecodeRouting:
    """Where one model's one-token decode step goes, held by that model (``decode_routing``): its layers and
    attention modules read it, and nothing outside the model does.

    Attributes:
        on: Inside the static decoder's step (``switched_on()``).
        matvec: The model's layers were prepared by ``use_triton_matvec``: one-row inputs take the Triton
            kernels, and one-query attention this framework's kernel, while ``on``.
    """

    def __init__(self) -> None:
        self.on = False
        self.matvec = False

    @contextlib.contextmanager
    def switched_on(self):
        """Inside, ``on`` is True; after, as it was."""
        previous = self.on
        self.on = True
        try:
            yield
        finally:
            self.on = previous

    @property
    def routes_matvec(self) -> bool:
        return self.on and self.matvec


ROUTING_ATTRIBUTE = "_smarter_decode_routing"


def decode_routing(model: torch.nn.Module) -> DecodeRouting:
    """The model's ``DecodeRouting``, made on first use and kept on the model instance (a peft wrapper and its
    base model share one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    routing = getattr(base, ROUTING_ATTRIBUTE, None)
    if routing is None:
        routing = DecodeRouting()
        setattr(base, ROUTING_ATTRIBUTE, routing)
    return routing


def _one_row_or_torch(
    original, layer: torch.nn.Linear, routing: DecodeRouting, x: torch.Tensor, *args, **kwargs
) -> torch.Tensor:
    weight = layer.weight
    one_row = routing.routes_matvec and x.numel() == x.shape[-1] and not torch.is_grad_enabled()
    if not one_row or x.dtype != weight.dtype or weight.stride(1) != 1:
        return original(x, *args, **kwargs)
    y = torch.ops.smarter.dense_matvec(x.reshape(-1), weight)
    if layer.bias is not None:
        y = y + layer.bias
    return y.view(*x.shape[:-1], weight.shape[0])
