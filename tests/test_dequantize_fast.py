"""CPU dequantize of every format, bit for bit, against straightforward numpy references of each layout.

The CPU paths work a chunk of rows at a time through bit tricks and lookup tables; these references decode
each element directly from the documented layouts (or, for ggml, with gguf-py), so they share no code with them.
Shapes cover several chunks with a ragged last one, rows wider than a chunk, and packed tensors that are
non-contiguous or start at an odd offset; contents cover quantized weights and raw random bytes (NaN, Inf and
subnormal scales and codes included).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from ipex_llm_tf.formats import LowBitFormat, Parts, get_format

# gguf's numpy reference and numpy's float math warn on the NaN/Inf inputs fed here; outputs are still compared.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

GGML = {"sym_int4": T.Q4_0, "asym_int4": T.Q4_1, "sym_int5": T.Q5_0, "asym_int5": T.Q5_1, "sym_int8": T.Q8_0}
OTHERS = ["nf4", "nf3", "fp4", "fp6", "fp8_e4m3", "fp8_e5m2", "fp16", "bf16"]
SHAPES = [(1, 64), (5, 192), (300, 1024), (2, (1 << 18) + 64)]  # 300 rows: 2 chunks; 2**18 + 64: wider than one
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _random_parts(fmt: LowBitFormat, n: int, k: int, seed: int) -> Parts:
    """Every stored tensor filled with random bytes."""
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for name, (shape, dtype) in fmt.part_specs(n, k).items():
        raw = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), dtype=torch.uint8, generator=g)
        parts[name] = raw.view(dtype).reshape(shape)
    return parts


def _quantized_parts(fmt: LowBitFormat, n: int, k: int, seed: int) -> Parts:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    w[0, :64] = 0.0
    return fmt.quantize(w)


def _awkward(parts: Parts) -> Parts:
    """The same values, stored one element past an aligned start (even parts) or column-major (odd parts)."""
    out = {}
    for i, (name, t) in enumerate(parts.items()):
        if i % 2:
            out[name] = t.t().contiguous().t()
        else:
            out[name] = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)
    return out


def _f32(t: torch.Tensor) -> np.ndarray:
    """A float16 / bfloat16 / float32 tensor's exact float32 values as numpy (bf16 by its bits)."""
    if t.dtype == torch.bfloat16:
        return (t.contiguous().view(torch.int16).numpy().astype(np.uint32) << 16).view(np.float32)
    return t.numpy().astype(np.float32)


def _codebook_reference(fmt, parts: Parts) -> np.ndarray:
    """values[code] * scale per element, each code read bit by bit from its plane as codebooks' docstring says."""
    scales = _f32(parts["scales"])
    n, k = scales.shape[0], scales.shape[1] * fmt.block_size
    e = np.arange(k)
    run, i = e // 32, e % 32
    codes = np.zeros((n, k), dtype=np.int64)
    shift = 0
    for name, bits in fmt.planes:
        width = 32 * bits // 8            # bytes per run of 32 in this plane
        byte = run * width + i % width    # byte j holds elements j, j + width, j + 2 * width, ...
        pos = (i // width) * bits
        packed = parts[name].numpy().astype(np.int64)
        codes |= ((packed[:, byte] >> pos) & ((1 << bits) - 1)) << shift
        shift += bits
    table = np.array(fmt.values.tolist(), dtype=np.float32)
    return table[codes] * scales[:, e // fmt.block_size]


def _float8_value(b: int, exp_bits: int, man_bits: int, ieee: bool) -> float:
    """Value of an 8-bit float pattern: e5m2 is IEEE-like (Inf, NaNs); e4m3fn has only NaN = all ones."""
    bias = (1 << (exp_bits - 1)) - 1
    sign = -1.0 if b & 0x80 else 1.0
    e, m = (b >> man_bits) & ((1 << exp_bits) - 1), b & ((1 << man_bits) - 1)
    if ieee and e == (1 << exp_bits) - 1:
        return sign * float("inf") if m == 0 else float("nan")
    if not ieee and (b & 0x7F) == 0x7F:
        return float("nan")
    frac = m / (1 << man_bits)
    return sign * (frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))


def _float8_reference(fmt, parts: Parts) -> np.ndarray:
    e5m2 = fmt.dtype == torch.float8_e5m2
    table = np.array([_float8_value(b, 5 if e5m2 else 4, 2 if e5m2 else 3, e5m2) for b in range(256)], np.float32)
    codes = parts["qweight"].contiguous().view(torch.uint8).numpy()
    return table[codes] * parts["scales"].numpy().astype(np.float32)


def _reference(name: str, parts: Parts) -> np.ndarray:
    fmt = get_format(name)
    if name in GGML:
        blocks = fmt.to_gguf_blocks({k: v.contiguous() for k, v in parts.items()})
        return quants.dequantize(blocks.numpy(), GGML[name]).astype(np.float32)
    if name.startswith("fp8"):
        return _float8_reference(fmt, parts)
    if name in ("fp16", "bf16"):
        return _f32(parts["weight"])
    return _codebook_reference(fmt, parts)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtype, shape, NaN positions and the bits of every other element."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    ints = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    assert torch.equal(actual.contiguous().view(ints)[~nan], expected.contiguous().view(ints)[~nan])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(GGML) + OTHERS)
def test_dequantize_matches_reference(name: str, shape: tuple[int, int]) -> None:
    fmt = get_format(name)
    n, k = shape
    for seed, parts in enumerate([_quantized_parts(fmt, n, k, 0), _random_parts(fmt, n, k, 1)]):
        expected = torch.from_numpy(_reference(name, parts))
        for variant in (parts, _awkward(parts)) if k < 1 << 18 else (parts,):
            for dtype in DTYPES:
                _assert_same(fmt.dequantize(variant, dtype), expected.to(dtype))
