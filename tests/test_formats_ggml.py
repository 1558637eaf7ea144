"""The ggml block formats against gguf-py's reference quantizers: same bytes, same dequantized floats."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

from ipex_llm_tf.formats import FormatError, LowBitFormat, get_format, list_formats

# gguf's numpy reference warns on the overflow/NaN cases it is fed here; its outputs are still compared.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FORMATS = {"sym_int4": T.Q4_0, "asym_int4": T.Q4_1, "sym_int5": T.Q5_0, "asym_int5": T.Q5_1,
           "sym_int8": T.Q8_0}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(n: int, k: int, scale: float, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(n, k, generator=_gen(seed)) * scale).to(dtype)


def _ties(n: int, k: int) -> torch.Tensor:
    """Blocks whose largest |x| occurs as both +a and -a, in either order, plus on-grid values."""
    w = torch.randint(-7, 8, (n, k), generator=_gen(3)).float() / 4  # many exact half-step points
    w[0::2, 0::32], w[0::2, 5::32] = -3.0, 3.0
    w[1::2, 0::32], w[1::2, 5::32] = 3.0, -3.0
    return w


def _signed_zeros(n: int, k: int) -> torch.Tensor:
    sign = torch.randint(0, 2, (n, k), generator=_gen(4)).float() * 2 - 1
    return torch.zeros(n, k) * sign


def _mixed_rows() -> torch.Tensor:
    """One row per kind of trouble: zero, constants, huge, tiny, normal."""
    rows = [torch.zeros(64), torch.full((64,), 0.37), torch.full((64,), -2.5), torch.full((64,), 6e4),
            _normal(1, 64, 1e-30, 5)[0], _normal(1, 64, 1.0, 6)[0]]
    return torch.stack(rows)


CASES: dict[str, Callable[[], torch.Tensor]] = {
    **{f"normal_s{seed}_x{scale:g}": (lambda seed=seed, scale=scale: _normal(7, 96, scale, seed))
       for seed in (0, 1, 2) for scale in (1e-3, 1.0, 50.0)},
    "N1_K32": lambda: _normal(1, 32, 0.02, 7),
    "N3_K96": lambda: _normal(3, 96, 1.0, 8),
    "N7_K4128": lambda: _normal(7, 4128, 0.05, 9),
    "zeros": lambda: torch.zeros(3, 96),
    "signed_zeros": lambda: _signed_zeros(3, 96),
    "const_pos": lambda: torch.full((3, 64), 0.37),
    "const_neg": lambda: torch.full((3, 64), -1.7),
    "large_6e4": lambda: _normal(3, 64, 1.0, 10).sign() * 6e4,
    "large_6e4_normal": lambda: _normal(3, 64, 3e4, 11),
    "huge_1e30": lambda: _normal(3, 64, 1e30, 12),
    "const_1e30": lambda: torch.full((2, 32), -1e30),
    "tiny_1e-30": lambda: _normal(3, 64, 1e-30, 13),
    "tiny_1e-8": lambda: _normal(3, 64, 1e-8, 14),
    "fp32_min_normal": lambda: _normal(3, 64, 1e-38, 15),  # scale is a subnormal: 1/d overflows
    "fp32_subnormal": lambda: _normal(3, 64, 1e-41, 16),
    "ties": lambda: _ties(4, 64),
    "mixed_rows": _mixed_rows,
    "fp16": lambda: _normal(5, 128, 1.0, 17, torch.float16),
    "fp16_large": lambda: _normal(3, 64, 4e4, 18).clamp(-65504, 65504).half(),
    "bf16": lambda: _normal(5, 128, 1.0, 19, torch.bfloat16),
    "bf16_huge": lambda: _normal(3, 64, 1e30, 20, torch.bfloat16),
}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical float32 tensors, treating any NaN as equal to any NaN."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    return torch.equal(a[~nan_a].view(torch.int32), b[~nan_b].view(torch.int32))


def _without_negative_zero_mins(fmt: LowBitFormat, blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Blocks with -0.0 fp16 scales/mins made +0.0: which zero numpy's min/max keep is unspecified."""
    parts = fmt.from_gguf_blocks(blocks, n, k)
    for key in ("scales", "mins"):
        parts[key] = parts[key] + 0.0
    return fmt.to_gguf_blocks(parts)


def _parts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(FORMATS))
def test_matches_gguf_reference(name: str, case: str) -> None:
    fmt, qtype = get_format(name), FORMATS[name]
    w = CASES[case]()
    n, k = w.shape
    parts = fmt.quantize(w)
    specs = fmt.part_specs(n, k)
    assert list(parts) == list(specs)
    assert {p: (tuple(t.shape), t.dtype) for p, t in parts.items()} == specs

    ref = quants.quantize(w.float().numpy(), qtype)
    ours = fmt.to_gguf_blocks(parts)
    if case == "signed_zeros" and name.startswith("asym"):
        ref = _without_negative_zero_mins(fmt, torch.from_numpy(ref), n, k).numpy()
        parts = fmt.from_gguf_blocks(ours := _without_negative_zero_mins(fmt, ours, n, k), n, k)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape
    mismatch = (ours.numpy() != ref).nonzero()
    assert mismatch[0].size == 0, f"bytes differ first at {[int(i[0]) for i in mismatch]}"

    ref_deq = torch.from_numpy(quants.dequantize(ref, qtype))
    assert _bits_equal(fmt.dequantize(parts), ref_deq)

    back = fmt.from_gguf_blocks(torch.from_numpy(ref), n, k)
    assert _parts_equal(back, parts)
    assert torch.equal(fmt.to_gguf_blocks(fmt.from_gguf_blocks(ref.tobytes(), n, k)), ours)


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_dtype_is_cast_of_float32(name: str) -> None:
    fmt = get_format(name)
    parts = fmt.quantize(_normal(4, 64, 1.0, 21))
    full = fmt.dequantize(parts)
    for dtype in (torch.float16, torch.bfloat16):
        out = fmt.dequantize(parts, dtype)
        assert out.dtype == dtype and torch.equal(out, full.to(dtype))


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_metadata(name: str) -> None:
    fmt, qtype = get_format(name), FORMATS[name]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert fmt.block_size == block_size == 32
    assert fmt.bits_per_weight == type_size * 8 / block_size
    assert fmt.gguf_type == int(qtype)
    assert fmt.description and "\n" not in fmt.description
    assert sum(np.prod(s) * dt.itemsize for s, dt in fmt.part_specs(3, 96).values()) == 3 * 3 * type_size


def test_registration_order() -> None:
    names = list_formats()
    assert [n for n in names if n in FORMATS] == list(FORMATS)


@pytest.mark.parametrize("name", ["asym_int4", "asym_int5"])
def test_asym_zero_min_and_scale_keep_first_zero(name: str) -> None:
    # ggml's C reference keeps the first of equal extremes; so do we, on every device.
    w = torch.tensor([[-0.0, 0.0] * 16, [0.0, -0.0] * 16, [-0.0] + [0.0] * 30 + [-0.0]])
    parts = get_format(name).quantize(w)
    assert torch.signbit(parts["mins"]).flatten().tolist() == [True, False, True]
    assert not torch.signbit(parts["scales"]).any()  # hi - lo of two equal zeros is +0.0


BAD_WEIGHTS: dict[str, Callable[[], torch.Tensor]] = {
    "in_not_multiple_of_32": lambda: torch.randn(4, 48),
    "one_dim": lambda: torch.randn(64),
    "int_dtype": lambda: torch.ones(4, 64, dtype=torch.int32),
    "empty": lambda: torch.zeros(0, 64),
    "nan": lambda: torch.randn(4, 64).index_fill_(1, torch.tensor([7]), float("nan")),
    "inf": lambda: torch.randn(4, 64).index_fill_(1, torch.tensor([9]), float("-inf")),
}


@pytest.mark.parametrize("bad", list(BAD_WEIGHTS))
@pytest.mark.parametrize("name", list(FORMATS))
def test_bad_weight_raises_format_error(name: str, bad: str) -> None:
    with pytest.raises(FormatError, match=r"model\.layers\.3\.mlp") as info:
        get_format(name).quantize(BAD_WEIGHTS[bad](), where="model.layers.3.mlp")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", list(FORMATS))
def test_from_gguf_blocks_rejects_wrong_size(name: str) -> None:
    fmt = get_format(name)
    raw = fmt.to_gguf_blocks(fmt.quantize(torch.randn(2, 64)))
    with pytest.raises(FormatError):
        fmt.from_gguf_blocks(raw[:, 1:], 2, 64)
    with pytest.raises(FormatError):
        fmt.from_gguf_blocks(raw, 2, 40)
