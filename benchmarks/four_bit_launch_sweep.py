"""Sweep the 4-bit decode kernel's launch shape against bitsandbytes on Mistral-7B's shapes (GPU only).

For each launch (output rows per program, quantization blocks of 64 weights per loop step, warps), times a
layer's seven one-row products (q, k, v, o, gate, up, down) over 8 layers of distinct random NF4 weights
(double quantization on, as the nf4 variants store them) in CUDA graphs, beside bitsandbytes' own kernel on
the same weights, and prints each with its bandwidth in TB/s of 4-bit weights read. The kernel is first
checked against bitsandbytes' dequantized weights. The fastest launch is printed last and, with ``--out``,
written as JSON (the form of ``lightning_modules.matvec_kernels.FOUR_BIT_LAUNCH``).

    python benchmarks/four_bit_launch_sweep.py --out four_bit_launch.json
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = [(4096, 4096, 2), (1024, 4096, 2), (14336, 4096, 2), (4096, 14336, 1)]  # (n, k, layers' count)
LAYERS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the fastest launch here as JSON")
    args = parser.parse_args()

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    from triton.testing import do_bench_cudagraph

    from lightning_modules import matvec_kernels

    torch.manual_seed(0)
    xs = {k: torch.randn(k, device="cuda", dtype=torch.bfloat16) for k in (4096, 14336)}
    layer_bytes = sum(count * n * k / 2 * (1 + 1 / 16) for n, k, count in SHAPES)  # 4-bit codes + scales
    items = []
    for n, k, count in SHAPES:
        for _ in range(LAYERS * count):
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            packed, state = bnb_functional.quantize_4bit(
                weight, blocksize=64, quant_type="nf4", compress_statistics=True
            )
            items.append((xs[k], packed, state, matvec_kernels.four_bit_operands(packed, state)))

    for x, packed, state, operands in items[:: 2 * LAYERS]:
        want = bnb_functional.dequantize_4bit(packed, state).float() @ x.float()
        got = torch.ops.smarter.four_bit_matvec(x, **operands).float()
        print(f"check: relative difference {((got - want).norm() / want.norm()).item():.2e}", flush=True)

    def per_layer_us(fn) -> float:
        return do_bench_cudagraph(fn) * 1000 / LAYERS

    library_us = per_layer_us(lambda: [bnb.matmul_4bit(x[None], p.t(), quant_state=s) for x, p, s, _ in items])
    print(f"bitsandbytes {library_us:.1f} us/layer {layer_bytes / library_us / 1e6:.2f} TB/s", flush=True)
    results = []
    for rows in (1, 2, 4, 8):
        for blocks in (4, 8, 16, 32):
            for warps in (1, 2, 4, 8):
                if not 2 <= rows * blocks * 8 / (32 * warps) <= 16:  # words a thread holds per loop step
                    continue
                matvec_kernels.FOUR_BIT_LAUNCH.update(rows=rows, blocks=blocks, warps=warps)
                try:
                    us = per_layer_us(lambda: [torch.ops.smarter.four_bit_matvec(x, **o) for x, _, _, o in items])
                except Exception as error:  # a launch that does not compile is reported, not fatal
                    print(f"rows {rows} blocks {blocks} warps {warps}: failed: {str(error)[:160]}", flush=True)
                    continue
                results.append((us, rows, blocks, warps))
                print(
                    f"rows {rows} blocks {blocks} warps {warps}: {us:.1f} us/layer "
                    f"{layer_bytes / us / 1e6:.2f} TB/s ({library_us / us:.2f}x bitsandbytes)",
                    flush=True,
                )
    us, rows, blocks, warps = min(results)
    print(f"fastest: rows {rows} blocks {blocks} warps {warps}, {us:.1f} us/layer, {library_us / us:.2f}x bitsandbytes")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "blocks": blocks, "warps": warps}, f)


if __name__ == "__main__":
    main()
