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


def use_triton_matvec(model: torch.nn.Module) -> int:
    """Prepare every plain ``nn.Linear`` of ``model`` with floating-point weights to send one-row inputs to
    the Triton kernel inside ``triton_matvec_routing()``; returns how many layers are prepared."""
    prepared = 0
    for layer in model.modules():
        if type(layer) is not torch.nn.Linear or not layer.weight.dtype.is_floating_point:
            continue  # bitsandbytes' layers subclass nn.Linear and keep their own kernels
        if not getattr(layer, "_smarter_matvec", False):
            layer.forward = functools.partial(_one_row_or_torch, layer.forward, layer)
            layer._smarter_matvec = True
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
