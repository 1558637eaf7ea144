"""Codebook formats: each weight is a small code into a fixed value table, times a per-block fp16 scale.

nf4 and nf3 use NormalFloat tables (QLoRA); fp4 (e2m1) and fp6 (e3m2) use minifloat tables whose code
is the float's own sign|exponent|mantissa bit pattern, as in the OCP Microscaling (MX) element types.

Packing. Codes are split into bit planes (4-, 2- or 1-bit fields, low bits first). Within every run of
32 consecutive inputs, a plane of `b` bits holds p = 8 // b codes per byte and byte j holds the elements
j, j + 32/p, j + 2*32/p, ... at bit offsets 0, b, 2b, ... So the 4-bit plane has the ggml Q4_0 nibble
order (byte j = element j | element j+16 << 4), the 2-bit plane holds j, j+8, j+16, j+24 and the 1-bit
plane j, j+4, ..., j+28. Unpacking a plane is one broadcast shift-and-mask, with no per-element gather.
"""
from __future__ import annotations

import torch

from . import register_format
from .base import FormatError, LowBitFormat, PartSpecs, Parts

_RUN = 32  # packing run length; every block size here is a multiple of it

# NF4 exactly as published with QLoRA / bitsandbytes (float32), so nf4 codes interoperate bit-for-bit.
# normal_float_levels(4, 0.9677083) reproduces it to ~1e-7 (the published table went through scipy).
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# NF3 derived the way QLoRA derives NF4, with 8 levels: offset = 1 - (1/(2*7) + 1/(2*8)) / 2 = 0.9330357
# (midway between the outermost quantile points for 7 and 8 bins), 4 positive levels
# ndtri(linspace(offset, 0.5, 5)[:-1]), 3 negative levels -ndtri(linspace(offset, 0.5, 4)[:-1]), an exact
# 0, all divided by ndtri(offset) = 1.4985. Asymmetric (one more positive level) so that 0 is exact.
NF3_LEVELS: tuple[float, ...] = (
    -1.0, -0.5350227355957031, -0.24693144857883453, 0.0,
    0.1833374947309494, 0.38199397921562195, 0.6229857802391052, 1.0,
)


def normal_float_offset(bits: int) -> float:
    """QLoRA's outermost quantile for a 2**bits-level NormalFloat table (0.9677083 for 4 bits)."""
    n = 2 ** bits
    return 1.0 - (1.0 / (2 * (n - 1)) + 1.0 / (2 * n)) / 2.0


def normal_float_levels(bits: int, offset: float | None = None) -> list[float]:
    """Sorted NormalFloat levels in [-1, 1]: N(0,1) quantiles, 2**(bits-1) positive, one fewer negative, 0."""
    n = 2 ** bits
    off = normal_float_offset(bits) if offset is None else offset
    pos = torch.special.ndtri(torch.linspace(off, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, n // 2, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (levels / levels.abs().max()).float().tolist()


def minifloat_values(exp_bits: int, man_bits: int, bias: int) -> list[float]:
    """Value of every sign|exponent|mantissa code of a minifloat with subnormals and no Inf/NaN codes."""
    values = []
    for code in range(2 ** (1 + exp_bits + man_bits)):
        sign = -1.0 if (code >> (exp_bits + man_bits)) & 1 else 1.0
        exp = (code >> man_bits) & (2 ** exp_bits - 1)
        frac = (code & (2 ** man_bits - 1)) / 2 ** man_bits
        mag = frac * 2.0 ** (1 - bias) if exp == 0 else (1.0 + frac) * 2.0 ** (exp - bias)
        values.append(sign * mag)
    return values


def pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [N, K] codes (< 2**bits) into uint8 [N, K*bits/8] in the run-of-32 order above."""
    n, k = codes.shape
    per = 8 // bits
    grouped = codes.to(torch.int32).reshape(n, k // _RUN, per, _RUN // per)
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int32) * bits).view(1, 1, per, 1)
    # fields never overlap, so summing the shifted codes is the same as OR-ing them
    return (grouped << shifts).sum(dim=2).to(torch.uint8).reshape(n, k * bits // 8)


def unpack_plane(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_plane: uint8 [N, K*bits/8] to codes uint8 [N, K]."""
    n, nbytes = packed.shape
    per = 8 // bits
    k = nbytes * per
    runs = packed.reshape(n, k // _RUN, 1, _RUN // per)
    shifts = (torch.arange(per, device=packed.device, dtype=torch.uint8) * bits).view(1, 1, per, 1)
    return ((runs >> shifts) & ((1 << bits) - 1)).reshape(n, k)


class CodebookFormat(LowBitFormat):
    """Per-block absmax scale (fp16) times a table value picked by a packed code."""

    version = 1
    gguf_type = None

    def __init__(self, name: str, values: list[float] | tuple[float, ...], block_size: int,
                 planes: tuple[tuple[str, int], ...], description: str) -> None:
        code_bits = sum(bits for _, bits in planes)
        if len(values) != 2 ** code_bits or block_size % _RUN:
            raise ValueError(f"{name}: {len(values)} values for {code_bits}-bit codes, block {block_size}")
        self.name = name
        self.block_size = block_size
        self.planes = planes
        self.description = description
        self.bits_per_weight = code_bits + 16 / block_size
        self.values = torch.tensor(values, dtype=torch.float32)  # value of each code
        self.max_abs = float(self.values.abs().max())
        # Nearest-value search runs on the distinct values in order; +0 and -0 collapse to the
        # lower code (+0), so equal inputs always get the same code.
        first_code: dict[float, int] = {}
        for code, v in enumerate(self.values.tolist()):
            first_code.setdefault(v, code)
        ordered = sorted(first_code)
        self._sorted_codes = torch.tensor([first_code[v] for v in ordered], dtype=torch.uint8)
        levels = torch.tensor(ordered, dtype=torch.float32)
        self._midpoints = (levels[:-1] + levels[1:]) / 2

    def part_specs(self, out_features: int, in_features: int) -> PartSpecs:
        """Bit planes (uint8) followed by the fp16 block scales."""
        self.check_shape(out_features, in_features)
        specs: PartSpecs = {name: ((out_features, in_features * bits // 8), torch.uint8)
                            for name, bits in self.planes}
        specs["scales"] = ((out_features, in_features // self.block_size), torch.float16)
        return specs

    def encode(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes uint8 [N, K] and fp16 scales [N, K/block] of a checked float weight."""
        n, k = weight.shape
        x = weight.to(torch.float32).reshape(n, k // self.block_size, self.block_size)
        absmax = x.abs().amax(dim=-1, keepdim=True)
        # Divide by a tensor, not a Python float: CUDA turns division by a scalar into multiplication
        # by its reciprocal, which can round differently from the CPU and change the stored scale.
        scale = (absmax / torch.full_like(absmax, self.max_abs)).to(torch.float16)
        if not bool(torch.isfinite(scale).all()):
            raise FormatError(f"weight: a block's absolute maximum exceeds {self.max_abs * 65504:g}, so its "
                              f"fp16 scale overflows in {self.name}; keep this layer in full precision.")
        # Divide by the scale as stored, so dequantization inverts exactly what was rounded here;
        # a zero (or fp16-underflowed) scale leaves x ~ 0, which maps to the exact-0 code.
        s = scale.to(torch.float32)
        y = (x / torch.where(s > 0, s, torch.ones_like(s))).reshape(n, k).contiguous()
        idx = torch.bucketize(y, self._midpoints.to(y.device))  # exact midpoints go to the lower level
        codes = self._sorted_codes.to(y.device)[idx]
        return codes, scale.reshape(n, k // self.block_size)

    def quantize(self, weight: torch.Tensor) -> Parts:
        """Nearest table value of each weight / block scale, packed into bit planes."""
        self.check_weight(weight)
        codes, scales = self.encode(weight)
        parts: Parts = {}
        shift = 0
        for name, bits in self.planes:
            parts[name] = pack_plane((codes >> shift) & ((1 << bits) - 1), bits)
            shift += bits
        parts["scales"] = scales
        return parts

    def codes(self, parts: Parts) -> torch.Tensor:
        """Unpacked codes uint8 [N, K] of packed parts."""
        codes: torch.Tensor | None = None
        shift = 0
        for name, bits in self.planes:
            plane = unpack_plane(parts[name], bits)
            codes = plane if codes is None else codes | (plane << shift)
            shift += bits
        assert codes is not None
        return codes

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Table value of each code times its block scale, in `dtype`."""
        codes = self.codes(parts)
        n, k = codes.shape
        values = self.values.to(codes.device)[codes.long()].reshape(n, k // self.block_size, self.block_size)
        scales = parts["scales"].to(torch.float32).unsqueeze(-1)
        return (values * scales).reshape(n, k).to(dtype)


FP4_VALUES = minifloat_values(exp_bits=2, man_bits=1, bias=1)  # 0 .5 1 1.5 2 3 4 6, then negatives
FP6_VALUES = minifloat_values(exp_bits=3, man_bits=2, bias=3)  # 0 .. 28; subnormals k/16 for k < 4

register_format(CodebookFormat(
    "nf4", NF4_LEVELS, 64, (("qweight", 4),),
    "NormalFloat4: 4-bit codes (Q4_0 nibble order) + fp16 absmax scale per 64"))
register_format(CodebookFormat(
    "nf3", NF3_LEVELS, 64, (("qlow", 2), ("qhigh", 1)),
    "NormalFloat3: 3-bit codes as 2-bit + 1-bit planes + fp16 absmax scale per 64"))
register_format(CodebookFormat(
    "fp4", FP4_VALUES, 32, (("qweight", 4),),
    "FP4 e2m1 (MX-style): 4-bit codes (Q4_0 nibble order) + fp16 scale absmax/6 per 32"))
register_format(CodebookFormat(
    "fp6", FP6_VALUES, 32, (("qlow", 4), ("qhigh", 2)),
    "FP6 e3m2 bias 3, subnormals, max 28: 4-bit + 2-bit planes + fp16 scale absmax/28 per 32"))
