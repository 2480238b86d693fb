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
    from lightning_modules.execution_plan import Platform, resolve_decoding

    gpu, cpu = Platform(device="cuda", capability=(9, 0), triton=True), Platform(device="cpu", triton=True)
    assert resolve_decoding("static-compiled", "auto", gpu) == ("static-compiled", "triton")
    assert resolve_decoding("static", "auto", gpu)[1] == "library"  # the uncompiled static loop stays the library's
    assert resolve_decoding("dynamic", "auto", gpu)[1] == "library"
    assert resolve_decoding("static", "auto", cpu)[1] == "library"
    assert resolve_decoding("static-compiled", "library", gpu)[1] == "library"
    assert resolve_decoding("static-compiled", "auto", Platform(device="cuda", triton=False))[1] == "library"


def _half_bits_to_float(bits: int, half: str) -> float:
    import numpy as np

    if half == "f16":
        return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])
    return float(np.array([(bits & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0])


def _float_to_half_bits(value: float, half: str) -> int:
    dtype = torch.float16 if half == "f16" else torch.bfloat16
    return int(torch.tensor(value, dtype=torch.float64).to(dtype).view(torch.int16).item()) & 0xFFFF


def _run_ptx(text: str, inputs: dict[str, int]) -> dict[str, float]:
    """A small interpreter for the 4-bit kernels' assembly (integer ops, ``prmt`` with sign mode, ``lop3``,
    16-bit unpacking, packed fp16 / bf16 fused multiply-adds rounded once as the hardware does, conversions
    to float32), so the very text the GPU compiles is checked here. ``inputs``: ``$i`` -> int32 bits;
    returns the float32 outputs written to ``$i`` registers."""
    regs: dict[str, int] = {name: value & 0xFFFFFFFF for name, value in inputs.items()}
    floats: dict[str, float] = {}

    def val(token: str) -> int:
        token = token.strip()
        return regs[token] if token in regs else int(token, 0) & 0xFFFFFFFF

    def prmt(a: int, b: int, c: int) -> int:
        src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
        out = 0
        for i in range(4):
            s = (c >> (4 * i)) & 0xF
            byte = src[s & 7]
            if s & 8:
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << (8 * i)
        return out

    for statement in text.replace("{\n", " ").replace("\n}", " ").split(";"):
        statement = statement.strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, _, rest = statement.partition(" ")
        if op == "mov.b32" and rest.lstrip().startswith("{p0"):  # mov.b32 {p0, p1}, r
            source = val(rest.split("}")[1].strip(" ,"))
            regs["p0"], regs["p1"] = source & 0xFFFF, source >> 16
            continue
        dst, *args = [t.strip() for t in rest.split(",")]
        if op.startswith("cvt.f32."):
            floats[dst] = _half_bits_to_float(val(args[0]), op.split(".")[2])
            continue
        if op == "add.f32":
            floats[dst] = float(torch.tensor(floats[args[0]] + floats[args[1]], dtype=torch.float32))
            continue
        a = [val(t) for t in args]
        if op == "mov.b32":
            regs[dst] = a[0]
        elif op == "and.b32":
            regs[dst] = a[0] & a[1]
        elif op == "or.b32":
            regs[dst] = a[0] | a[1]
        elif op == "shr.b32":
            regs[dst] = a[0] >> a[1]
        elif op == "shl.b32":
            regs[dst] = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "prmt.b32":
            regs[dst] = prmt(a[0], a[1], a[2])
        elif op == "lop3.b32":
            assert a[3] == 0xD8  # (a & ~c) | (b & c)
            regs[dst] = ((a[0] & ~a[2]) | (a[1] & a[2])) & 0xFFFFFFFF
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            half = "bf16" if "bf16" in op else "f16"
            out = 0
            for lane in (0, 1):  # each half: a * b + c exactly, then rounded to nearest even once
                x, y, z = (_half_bits_to_float(v >> (16 * lane), half) for v in a)
                out |= _float_to_half_bits(x * y + z, half) << (16 * lane)
            regs[dst] = out
        else:
            raise AssertionError(f"instruction not interpreted: {statement}")
    return {name: value for name, value in floats.items() if name.startswith("$")}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_decode_assembly_gives_each_weights_code_in_order(quant_type):
    import numpy as np

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from lightning_modules.matvec_kernels import decode_asm

    _, state = bnb_functional.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type=quant_type)
    code = state.code.float().tolist()
    text = decode_asm(code)
    code16 = np.asarray(code, dtype=np.float16).astype(float)
    words = [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF, *np.random.default_rng(0).integers(0, 2**32, 300).tolist()]
    for word in words:
        nibbles = [v for i in range(4) for v in ((word >> (8 * i + 4)) & 15, (word >> (8 * i)) & 15)]
        out = _run_ptx(text, {"$8": word})
        assert [out[f"${i}"] for i in range(8)] == [code16[v] for v in nibbles], hex(word)


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_dot_assembly_sums_each_weights_code_times_its_x(quant_type, x_dtype):
    import numpy as np

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from lightning_modules.matvec_kernels import dot_asm, dot_tables

    _, state = bnb_functional.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type=quant_type)
    code = state.code.float().tolist()
    text = dot_asm(code, x_dtype)
    half = "bf16" if x_dtype == "bfloat16" else "f16"
    dtype = getattr(torch, x_dtype)
    codes = torch.tensor(code).to(dtype).double().tolist()  # the codes in x's dtype
    registers = {f"${6 + i}": value for i, value in enumerate(dot_tables(code, x_dtype))}
    rng = np.random.default_rng(1)
    words = [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF, *rng.integers(0, 2**32, 200).tolist()]
    for word in words:
        x = torch.randn(8, generator=torch.Generator().manual_seed(word % 1000)).to(dtype)
        pairs = x.view(torch.int32).tolist()  # x 2i in the low half of pair i
        nibbles = [v for i in range(4) for v in ((word >> (8 * i + 4)) & 15, (word >> (8 * i)) & 15)]
        got = _run_ptx(text, {"$1": word, **{f"${2 + i}": p for i, p in enumerate(pairs)}, **registers})["$0"]
        # the same sums as the hardware forms them: even and odd weights apart, rounded to x's dtype each step
        lanes = []
        for first in (0, 1):
            total = 0.0
            for t in range(first, 8, 2):
                total = _half_bits_to_float(_float_to_half_bits(codes[nibbles[t]] * float(x[t]) + total, half), half)
            lanes.append(total)
        assert got == float(torch.tensor(lanes[0] + lanes[1], dtype=torch.float32)), hex(word)
        exact = sum(codes[nibbles[t]] * float(x[t]) for t in range(8))
        scale = sum(abs(codes[nibbles[t]] * float(x[t])) for t in range(8))
        assert abs(got - exact) <= 2e-2 * scale + 1e-6, hex(word)  # 16-bit rounding only


@pytest.fixture
def four_bit_interpreted(monkeypatch):
    from lightning_modules import matvec_kernels

    launches = count_calls(monkeypatch, matvec_kernels, "_four_bit_kernel")
    # the interpreter's launch: 16 blocks of 64 a tile, whatever the shipped launch (the shapes below are
    # chosen against it: a partial last tile and whole tiles)
    monkeypatch.setitem(matvec_kernels.FOUR_BIT_LAUNCH, "rows", 16)
    monkeypatch.setitem(matvec_kernels.FOUR_BIT_LAUNCH, "blocks", 16)
    return launches


@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("shape", [(40, 320), (32, 1024)])  # 5 blocks a row: a partial last tile / whole tiles
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_the_four_bit_kernel_gives_the_dequantized_product(four_bit_interpreted, quant_type, nested, shape, x_dtype):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from lightning_modules.matvec_kernels import four_bit_operands

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=nested
    )
    x = torch.randn(shape[1], generator=generator).to(x_dtype)
    got = torch.ops.smarter.four_bit_matvec(x, **four_bit_operands(packed, state))
    want = bnb_functional.dequantize_4bit(packed, state).float() @ x.float()
    assert got.shape == (shape[0],) and got.dtype == x_dtype and four_bit_interpreted == [1]
    assert (got.float() - want).norm() / want.norm() < 1e-2  # fp16 codes here, 16-bit output


def test_the_routed_nf4_decode_step_gives_bitsandbytes_logits(interpreted, four_bit_interpreted):
    pytest.importorskip("bitsandbytes")
    from lightning_modules import ModelSpec, load_causal_lm
    from lightning_modules.model_building import LoraSettings

    # QLoRA's model as predict holds it after fine-tuning: adapters (trained: B not zero) over the 4-bit base
    spec = ModelSpec(source="tiny", dtype="bfloat16", quantization="nf4", lora=LoraSettings(dropout=0.0))
    torch.manual_seed(0)
    model = load_causal_lm(spec, torch.device("cpu")).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    prompt = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(1))

    def step_logits(triton_matvec: bool = False, four_bit_matvec: bool = True) -> torch.Tensor:
        return decode_step_logits(model, prompt, triton_matvec, four_bit_matvec)

    library = step_logits()
    with model.disable_adapter():
        without_adapters = step_logits()
    # the adapters' share of the logits, far above the tolerances below
    assert (without_adapters - library).norm() / library.norm() > 0.1
    float_only = step_logits(triton_matvec=True, four_bit_matvec=False)
    assert four_bit_interpreted == []  # the 4-bit layers kept bitsandbytes' kernel
    routed = step_logits(triton_matvec=True)  # the 4-bit layers too, by default
    assert len(four_bit_interpreted) == model.config.num_hidden_layers * 7  # every projection, the prefill none
    # bf16 activations: each product rounds to bf16 on either path (relative 4e-3 a value)
    assert (float_only - library).norm() / library.norm() < 2e-2
    assert (routed - library).norm() / library.norm() < 2e-2
    assert (routed - float_only).norm() / library.norm() < 2e-2


def test_the_four_bit_kernel_is_used_only_where_its_assembly_compiles(monkeypatch):
    """Its PTX needs an NVIDIA GPU of compute capability 8.0 or later; elsewhere bitsandbytes' kernel stays."""
    from lightning_modules import matvec_kernels

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, runs in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert matvec_kernels.four_bit_assembly_runs_on(cuda) is runs, capability
    monkeypatch.setattr(torch.version, "hip", "6.2")  # a ROCm build: its "cuda" devices are AMD's
    assert not matvec_kernels.four_bit_assembly_runs_on(cuda)
    assert matvec_kernels.four_bit_assembly_runs_on(torch.device("cpu"))  # Triton's interpreter

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnb_functional.quantize_4bit(torch.randn(64, 128), blocksize=64, quant_type="nf4")
    assert matvec_kernels.four_bit_operands(packed, state) is not None
    monkeypatch.setattr(matvec_kernels, "four_bit_assembly_runs_on", lambda device: False)
    assert matvec_kernels.four_bit_operands(packed, state) is None  # use_triton_matvec then leaves the layer alone
