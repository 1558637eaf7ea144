"""Accuracy, layout and input checks for the codebook (nf4/nf3/fp4/fp6), float8 and plain formats."""
from __future__ import annotations

import pytest
import torch

from ipex_llm_tf.formats import FormatError, get_format, list_formats
from ipex_llm_tf.formats.codebooks import (
    FP4_VALUES, FP6_VALUES, NF3_LEVELS, NF4_LEVELS, CodebookFormat, normal_float_levels, pack_plane,
    unpack_plane)

CODEBOOK = ["nf4", "nf3", "fp4", "fp6"]
FLOAT8 = ["fp8_e4m3", "fp8_e5m2"]
LOSSY = CODEBOOK + FLOAT8
PLAIN = {"fp16": torch.float16, "bf16": torch.bfloat16}
ALL = LOSSY + list(PLAIN)

# SQNR (dB) measured on torch 2.13 CPU with the matrices below:
#            normal   heavy-tailed
# nf4        20.71    20.02
# nf3        14.10    13.57
# fp4        19.88    21.81
# fp6        26.41    31.45
# fp8_e4m3   31.56    35.28
# fp8_e5m2   25.59    29.24
# Bounds sit ~1 dB (normal) and ~2 dB (heavy-tailed) below. Minifloats score higher on heavy tails
# because the outliers dominate the signal and their relative error is what a float keeps bounded.
NORMAL_BOUND = {"nf4": 19.7, "nf3": 13.1, "fp4": 18.9, "fp6": 25.4, "fp8_e4m3": 30.5, "fp8_e5m2": 24.6}
HEAVY_BOUND = {"nf4": 18.0, "nf3": 11.5, "fp4": 19.8, "fp6": 29.4, "fp8_e4m3": 33.2, "fp8_e5m2": 27.2}


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of approx against ref, in dB."""
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


def normal_matrix() -> torch.Tensor:
    """Seeded N(0,1) 256x1024 weight."""
    return torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))


def heavy_tailed_matrix() -> torch.Tensor:
    """Seeded Student-t (3 dof) 256x1024 weight with 256 entries blown up 20x."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 1024, generator=g)
    chi2 = torch.randn(256, 1024, 3, generator=g).pow(2).sum(-1)
    w = z / (chi2 / 3).sqrt()
    w.view(-1)[torch.randint(0, w.numel(), (256,), generator=g)] *= 20
    return w


def roundtrip(name: str, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    fmt = get_format(name)
    return fmt.dequantize(fmt.quantize(w), dtype)


def test_all_registered_with_metadata():
    expected_bits = {"nf4": 4.25, "nf3": 3.25, "fp4": 4.5, "fp6": 6.5, "fp8_e4m3": 8.0, "fp8_e5m2": 8.0,
                     "fp16": 16.0, "bf16": 16.0}
    names = list_formats()
    for name, bits in expected_bits.items():
        assert name in names
        fmt = get_format(name)
        assert fmt.bits_per_weight == bits
        assert fmt.version == 1 and fmt.gguf_type is None and fmt.description
    assert [get_format(n).block_size for n in CODEBOOK] == [64, 64, 32, 32]


@pytest.mark.parametrize("name", LOSSY)
def test_sqnr_normal(name):
    w = normal_matrix()
    assert sqnr_db(w, roundtrip(name, w)) > NORMAL_BOUND[name]


@pytest.mark.parametrize("name", LOSSY)
def test_sqnr_heavy_tailed(name):
    w = heavy_tailed_matrix()
    assert sqnr_db(w, roundtrip(name, w)) > HEAVY_BOUND[name]


@pytest.mark.parametrize("name", list(PLAIN))
@pytest.mark.parametrize("src", [torch.float32, torch.float16, torch.bfloat16])
def test_plain_roundtrip_is_cast(name, src):
    w = normal_matrix()[:16, :40].to(src)
    fmt = get_format(name)
    parts = fmt.quantize(w)
    assert torch.equal(parts["weight"], w.to(PLAIN[name]))
    assert torch.equal(fmt.dequantize(parts), w.to(PLAIN[name]).float())
    assert fmt.dequantize(parts, torch.float16).dtype == torch.float16


@pytest.mark.parametrize("name", ALL)
def test_parts_match_part_specs(name):
    fmt = get_format(name)
    w = normal_matrix()[:48, :128]
    parts = fmt.quantize(w)
    specs = fmt.part_specs(48, 128)
    assert list(parts) == list(specs)
    for key, (shape, dtype) in specs.items():
        assert tuple(parts[key].shape) == shape and parts[key].dtype == dtype, key
    empty = fmt.empty_parts(48, 128)
    assert {k: (tuple(v.shape), v.dtype) for k, v in empty.items()} == specs


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16])
def test_half_inputs_and_non_contiguous(name, src):
    fmt = get_format(name)
    w = normal_matrix()[:32, :128]
    ref = fmt.dequantize(fmt.quantize(w.to(src)))
    strided = w.to(src).t().contiguous().t()
    assert torch.equal(fmt.dequantize(fmt.quantize(strided)), ref)


def test_nf4_codebook():
    levels = torch.tensor(NF4_LEVELS)
    assert len(NF4_LEVELS) == 16 and 0.0 in NF4_LEVELS
    assert torch.equal(levels, levels.sort().values) and levels.unique().numel() == 16
    assert levels.min() == -1.0 and levels.max() == 1.0


def test_normal_float_tables_follow_their_derivation():
    assert torch.allclose(torch.tensor(normal_float_levels(4, 0.9677083)), torch.tensor(NF4_LEVELS), atol=1e-6)
    assert torch.allclose(torch.tensor(normal_float_levels(4)), torch.tensor(NF4_LEVELS), atol=1e-6)
    assert torch.allclose(torch.tensor(normal_float_levels(3)), torch.tensor(NF3_LEVELS), atol=1e-6)
    assert len(NF3_LEVELS) == 8 and 0.0 in NF3_LEVELS and NF3_LEVELS[0] == -1.0 and NF3_LEVELS[-1] == 1.0


def test_minifloat_tables():
    assert sorted({abs(v) for v in FP4_VALUES}) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert FP4_VALUES[0b0111] == 6.0 and FP4_VALUES[0b1111] == -6.0 and FP4_VALUES[0b0001] == 0.5
    assert len(FP6_VALUES) == 64 and max(FP6_VALUES) == 28.0 and min(FP6_VALUES) == -28.0
    assert FP6_VALUES[1:4] == [1 / 16, 2 / 16, 3 / 16] and FP6_VALUES[0b000100] == 0.25
    assert FP6_VALUES[0b111011] == -14.0  # sign 1, exponent 6 -> 2**3, mantissa 3 -> 1.75
    pos = sorted(v for v in FP6_VALUES if v > 0)
    assert all(b > a for a, b in zip(pos, pos[1:]))  # no duplicate positives: every code is useful


def codebook_matrix(fmt: CodebookFormat, t: float) -> torch.Tensor:
    """Rows cycling through every table value times t, each block's first entry set to the table max."""
    n_rows, k = 8, 4 * max(fmt.block_size, 64)
    values = fmt.values
    idx = (torch.arange(n_rows * k) * 7 + torch.arange(n_rows * k) // 64) % values.numel()
    w = values[idx].reshape(n_rows, k // fmt.block_size, fmt.block_size).clone()
    w[:, :, 0] = values.abs().max()
    w[:, 1::2, 0] *= -1 if values.min() == -values.max() else 1
    return (w * t).reshape(n_rows, k)


@pytest.mark.parametrize("name", CODEBOOK)
@pytest.mark.parametrize("t", [1.0, 0.375, 3.0, 2.0 ** -10])
def test_codebook_values_roundtrip_exactly(name, t):
    fmt = get_format(name)
    w = codebook_matrix(fmt, t)
    assert torch.equal(roundtrip(name, w), w)


@pytest.mark.parametrize("name", CODEBOOK)
def test_codes_are_nearest_table_value(name):
    fmt = get_format(name)
    w = heavy_tailed_matrix()[:64, :256]
    parts = fmt.quantize(w)
    scale = parts["scales"].float().repeat_interleave(fmt.block_size, dim=1)
    y = w / scale
    levels = fmt.values.unique()
    nearest = levels[(y.unsqueeze(-1) - levels).abs().argmin(-1)]
    assert torch.equal(fmt.values[fmt.codes(parts).long()], nearest)


@pytest.mark.parametrize("bits", [4, 2, 1])
def test_plane_layout(bits):
    per = 8 // bits
    codes = torch.randint(0, 2 ** bits, (3, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    packed = pack_plane(codes, bits)
    assert packed.shape == (3, 96 * bits // 8) and packed.dtype == torch.uint8
    span = 32 // per
    for run in range(3):
        for j in range(span):
            expect = sum(int(codes[1, run * 32 + j + i * span]) << (i * bits) for i in range(per))
            assert int(packed[1, run * span + j]) == expect
    assert torch.equal(unpack_plane(packed, bits), codes)


def test_nf4_nibble_order_matches_q4_0():
    fmt = get_format("nf4")
    w = codebook_matrix(fmt, 1.0)
    codes = fmt.codes(fmt.quantize(w))
    q = fmt.quantize(w)["qweight"]
    assert int(q[0, 0]) == int(codes[0, 0]) | int(codes[0, 16]) << 4
    assert int(q[0, 17]) == int(codes[0, 33]) | int(codes[0, 49]) << 4


@pytest.mark.parametrize("name", LOSSY)
def test_zero_rows_and_blocks(name):
    w = normal_matrix()[:8, :128].clone()
    w[2] = 0
    w[5, :64] = 0
    out = roundtrip(name, w)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all() and (out[5, :64] == 0).all()
    assert torch.equal(roundtrip(name, torch.zeros(4, 128)), torch.zeros(4, 128))


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_dtype(name, dtype):
    fmt = get_format(name)
    parts = fmt.quantize(normal_matrix()[:16, :128])
    out = fmt.dequantize(parts, dtype)
    assert out.dtype == dtype and out.shape == (16, 128)
    assert torch.equal(out, fmt.dequantize(parts).to(dtype))


@pytest.mark.parametrize("name", FLOAT8)
def test_float8_row_max_saturates_to_dtype_max(name):
    fmt = get_format(name)
    w = normal_matrix()[:16, :100] * 1e3  # float8 has no block constraint on K
    parts = fmt.quantize(w)
    q = parts["qweight"].float()
    assert torch.isfinite(q).all()
    assert torch.equal(q.abs().amax(1), torch.full((16,), torch.finfo(fmt.dtype).max))
    assert sqnr_db(w, fmt.dequantize(parts)) > NORMAL_BOUND[name]


def test_fp16_scale_overflow_raises():
    w = torch.zeros(2, 64)
    w[0, 0] = 1e6  # 1e6 / 6 exceeds the fp16 range of fp4's block scale
    with pytest.raises(FormatError, match="overflows"):
        get_format("fp4").quantize(w)


@pytest.mark.parametrize("name", ALL)
def test_bad_weights_raise(name):
    fmt = get_format(name)
    bad = [torch.zeros(0, 64), torch.zeros(4, 0), torch.zeros(64), torch.zeros(2, 64, 64),
           torch.zeros(4, 64, dtype=torch.int32), torch.zeros(4, 64, dtype=torch.float64)]
    for value in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(4, 64)
        w[1, 3] = value
        bad.append(w)
    if fmt.block_size > 1:
        bad.append(torch.randn(4, fmt.block_size + 16))
    for w in bad:
        with pytest.raises(FormatError):
            fmt.quantize(w)


@pytest.mark.parametrize("name", CODEBOOK)
def test_part_specs_reject_unaligned(name):
    fmt = get_format(name)
    with pytest.raises(FormatError):
        fmt.part_specs(4, fmt.block_size + 16)
