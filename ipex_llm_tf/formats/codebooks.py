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

import ctypes
import sys
from typing import Callable

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
        scales = parts["scales"]
        if cpu_fast_path(parts):
            n, k = scales.shape[0], scales.shape[1] * self.block_size
            planes = [(_byte_rows(parts[name]), bits) for name, bits in self.planes]
            layout = self._minifloat_layout()

            def fill(codes: torch.Tensor, scratch: torch.Tensor, r0: int) -> None:
                _fill_codes(codes, scratch, planes, r0)
                if layout is not None:
                    _minifloat_to_half_top_byte(codes, scratch, *layout)

            if layout is None:
                return _dequantize_codes(n, k, dtype, fill, self.block_size, scales, pairs=self._pair_table())

            # the fp16 decode is the value / 2**(15 - bias): fold that power of two into the (fp16, so never
            # overflowing) scales, exactly; value * scale then rounds as before
            scales = scales.to(torch.float32) * 2.0 ** (15 - layout[2])
            return _dequantize_codes(n, k, dtype, fill, self.block_size, scales, top_bytes=True)
        codes = self.codes(parts)
        n, k = codes.shape
        values = self.values.to(codes.device)[codes.long()].reshape(n, k // self.block_size, self.block_size)
        return (values * scales.to(torch.float32).unsqueeze(-1)).reshape(n, k).to(dtype)

    def _pair_table(self) -> torch.Tensor:
        """This format's code-pair table (see pair_table), built once."""
        if getattr(self, "_pairs", None) is None:
            self._pairs = pair_table(self.values)
        return self._pairs

    def _minifloat_layout(self) -> tuple[int, int, int] | None:
        """(exp_bits, man_bits, bias) if the table is minifloat_values with at most 2 mantissa bits, else None."""
        # Such codes are the top byte of an fp16 once the fields are moved (see _minifloat_to_half_top_byte): a
        # vectorized fp16 cast then replaces the table gather.
        if not hasattr(self, "_layout"):
            bits, table = sum(b for _, b in self.planes), self.values.tolist()
            exps = range(max(1, bits - 3), min(5, bits - 1) + 1)  # fp16 has 5 exponent bits; mantissa <= 2 bits
            layouts = [(e, bits - 1 - e, bias) for e in exps for bias in range(16)]
            self._layout = next((lay for lay in layouts if minifloat_values(*lay) == table), None)
        return self._layout


# -- fast CPU dequantization ----------------------------------------------------------------------------------------
# Shared with the ggml block formats. A plain `values[codes] * scales` spends its time in int64 index tensors,
# full-size float32 temporaries and a fresh output's page faults. Instead, one chunk of rows at a time: unpack the
# planes into natural-order codes with 8-byte SWAR words, read each pair of neighbouring codes as one int16 and
# gather both float32 values at once from a table of 8-byte words indexed by that int16, multiply by the block
# scale in float32 and cast into the output. Each element is still the float32 product table value * scale,
# rounded once to `dtype`, so results are bit-identical to the plain expression.
_CHUNK_ELEMENTS = 1 << 19  # weights per chunk (~8 MB of intermediates, in L3): of 2**16..2**20, 2**19 was fastest;
# smaller chunks pay per-op overhead (and a thread barrier per op), larger ones fall out of cache
_M4, _M2, _M1 = 0x0F0F0F0F0F0F0F0F, 0x0303030303030303, 0x01010101  # low 4/2/1 bits of every byte of a word
_HUGE_PAGE, _MADV_HUGEPAGE = 1 << 21, 14


def _load_madvise() -> "Callable[[int, int, int], int] | None":
    """libc's madvise where it exists (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _load_madvise()


def empty_output(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on CPU, asking Linux for transparent huge pages for the bulk of a large result."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if _MADVISE is not None and nbytes >= 8 * _HUGE_PAGE:
        # A fresh multi-MB tensor is mmapped; faulting it in 4 KiB pages costs more than the whole dequantization
        # (~14 ms for 32 MB here). With MADV_HUGEPAGE it is faulted 2 MiB at a time (~3.5 ms). Only a hint: an
        # error (THP disabled, older kernel) just leaves the small pages.
        start = (out.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (out.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _MADVISE(start, end - start, _MADV_HUGEPAGE)
    return out


def cpu_fast_path(parts: Parts) -> bool:
    """Whether the chunked CPU dequantize applies: all parts on the CPU, none needing gradients (it writes in place)."""
    # The word-level bit tricks read bytes as little-endian integers.
    return sys.byteorder == "little" and all(t.device.type == "cpu" and not t.requires_grad for t in parts.values())


def chunk_rows(n: int, k: int) -> int:
    """Rows per chunk for an [n, k] weight processed a chunk of rows at a time."""
    return max(1, min(n, _CHUNK_ELEMENTS // k))


def pair_table(values: torch.Tensor) -> torch.Tensor:
    """int64 [256 * len(values)]: entry c0 + 256 * c1 is the float32 pair (values[c0], values[c1]) as one word."""
    # Indexed by two adjacent uint8 codes read as one little-endian int16, so no arithmetic forms the index;
    # entries with c0 >= len(values) are never read (a 4-bit table is 32 KiB, a 6-bit one 128 KiB).
    n = values.numel()
    pairs = torch.zeros(n, 256, 2, dtype=torch.float32)
    pairs[:, :n, 0] = values.float()
    pairs[:, :, 1] = values.float().unsqueeze(-1)
    return pairs.view(torch.int64).reshape(n * 256)


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D packed tensor as contiguous bytes [N, row bytes] whose rows can be viewed as 16-byte words."""
    t = t.contiguous()
    if t.storage_offset() % 16:  # a view of an unaligned slice (e.g. of a memory-mapped file): realign by copying
        t = t.clone()
    return t.view(torch.uint8)


_SHIFTS = {2: torch.arange(0, 8, 2, dtype=torch.int64), 1: torch.arange(8, dtype=torch.int32)}


def _unpack_into(dst: torch.Tensor, packed: torch.Tensor, bits: int) -> None:
    """Codes of packed plane rows (uint8 [r, K*bits/8]) into dst (uint8 [r, K], natural order); see pack_plane."""
    r, k = dst.shape
    runs = k // _RUN
    if bits == 4:  # run = 16 bytes; their low nibbles are elements 0..15, high nibbles 16..31
        # Copy whole runs as complex128 (16-byte) elements: a strided copy of 2-word pieces runs ~4x slower.
        halves = dst.view(torch.complex128).view(r, runs, 2)
        halves[:, :, 0].copy_(packed.view(torch.complex128))
        high = torch.bitwise_right_shift(packed.view(torch.int64), 4)
        halves[:, :, 1].copy_(high.view(torch.complex128))
        dst.view(torch.int64).bitwise_and_(_M4)
    elif bits == 2:  # run = 1 word; bits 2m..2m+1 of its bytes are elements 8m..8m+7
        d = dst.view(torch.int64).view(r, runs, 4)
        torch.bitwise_right_shift(packed.view(torch.int64).view(r, runs, 1), _SHIFTS[2], out=d)
        d.bitwise_and_(_M2)
    else:  # run = one 4-byte word; bit m of its bytes are elements 4m..4m+3
        d = dst.view(torch.int32).view(r, runs, 8)
        torch.bitwise_right_shift(packed.view(torch.int32).view(r, runs, 1), _SHIFTS[1], out=d)
        d.bitwise_and_(_M1)


def _fill_codes(codes: torch.Tensor, scratch: torch.Tensor, planes: list[tuple[torch.Tensor, int]], r0: int) -> None:
    """Codes of rows r0.. (as many as codes has) of a codebook format's planes, low plane first."""
    r, k = codes.shape
    high = scratch[:, :k]
    shift = 0
    for i, (packed, bits) in enumerate(planes):
        _unpack_into(high if i else codes, packed[r0:r0 + r], bits)
        if i:  # code bits never cross a byte, so whole words can be shifted and merged
            words = high.view(torch.int64)
            words.bitwise_left_shift_(shift)
            codes.view(torch.int64).bitwise_or_(words)
        shift += bits


def _minifloat_to_half_top_byte(codes: torch.Tensor, scratch: torch.Tensor, exp_bits: int, man_bits: int,
                                bias: int) -> None:
    """Turn sign|exponent|mantissa codes into the top byte of fp16s worth value / 2**(15 - bias), in place."""
    # fp16 is s eeeee mmmmmmmmmm: the code's sign goes to bit 7 of the top byte, its exponent to the low bits of
    # fp16's, its mantissa (<= 2 bits) just below. Subnormals line up too: fp16's are scaled by the same 2**(15 - bias).
    field = exp_bits + man_bits
    words, sign = codes.view(torch.int64), scratch[:, :codes.shape[1]].view(torch.int64)
    torch.bitwise_and(words, int.from_bytes(bytes([1 << field]) * 8, "little"), out=sign)
    sign.bitwise_left_shift_(7 - field)
    words.bitwise_and_(int.from_bytes(bytes([(1 << field) - 1]) * 8, "little"))
    words.bitwise_left_shift_(2 - man_bits)
    words.bitwise_or_(sign)


def _dequantize_codes(n: int, k: int, dtype: torch.dtype, fill: Callable[[torch.Tensor, torch.Tensor, int], None],
                      block: int, scales: torch.Tensor, mins: torch.Tensor | None = None, *,
                      pairs: torch.Tensor | None = None, offset: int = 0, top_bytes: bool = False) -> torch.Tensor:
    """[N, K] `dtype` weight, value(code) * block scale (+ block min) in float32, chunk by chunk of rows.

    value(code) is the pair_table lookup `pairs`; or, with top_bytes, the fp16 whose top byte the code is; or else
    the code minus `offset` (ggml's integer codes). Converting to float beats the gather where it applies.
    """
    rows = chunk_rows(n, k)
    out = empty_output((n, k), dtype)
    codes = torch.empty(rows, k, dtype=torch.uint8)
    scratch = torch.empty(rows, 2 * k, dtype=torch.uint8)  # for fill()
    if pairs is not None:
        index = torch.empty(rows, k // 2, dtype=torch.int64)
        gathered = torch.empty(rows, k // 2, dtype=torch.int64)
        table = pairs.expand(rows, pairs.numel())  # gather() wants the table once per index row
    elif top_bytes:
        half = torch.empty(rows, k, dtype=torch.int16)
    staging = None if dtype == torch.float32 else torch.empty(rows, k, dtype=torch.float32)
    scales = scales.to(torch.float32).unsqueeze(-1)
    mins = None if mins is None else mins.to(torch.float32).unsqueeze(-1)
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        fill(codes[:r], scratch[:r], r0)
        dst = out[r0:r0 + r] if staging is None else staging[:r]
        blocks = dst.view(r, k // block, block)
        if pairs is not None:
            index[:r].copy_(codes[:r].view(torch.int16))  # c0 + 256 * c1 (little-endian)
            torch.gather(table[:r], 1, index[:r], out=gathered[:r])
            torch.mul(gathered[:r].view(torch.float32).view(r, k // block, block), scales[r0:r0 + r], out=blocks)
        else:
            if top_bytes:
                dst.copy_(half[:r].copy_(codes[:r]).bitwise_left_shift_(8).view(torch.float16))
            else:
                dst.copy_(codes[:r])
                if offset:
                    dst.sub_(offset)  # exact: small integers
            blocks.mul_(scales[r0:r0 + r])
        if mins is not None:  # ggml's asymmetric formats: d * q + m, rounded after each step as there
            blocks.add_(mins[r0:r0 + r])
        if staging is not None:
            out[r0:r0 + r].copy_(dst)
    return out


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
