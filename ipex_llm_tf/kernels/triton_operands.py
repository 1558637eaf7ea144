"""What the Triton low-bit kernels read of a weight: views of its stored tensors plus static facts, built once.

`block_operands` views a block format's codes as int32 words (no copy) with its scales, mins and 5th bits;
`fp8_operands` a float8 weight as the device's native float8 or as bytes. Nothing derived from the weight is kept
except these views and, for the codebook formats, their value table (for nf3 also a table of value pairs, shared by
every weight of the format on a device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl

from ..formats import LowBitFormat, Parts
from ..formats.codebooks import CodebookFormat, minifloat_values
from ..formats.float8 import Float8Format
from ..formats.ggml_blocks import GgmlBlockFormat
from . import triton_gemv as G
from .triton_tuning import _interpreting, capturing

# float8 loads and conversions Triton can lower natively (sm_89+: Ada, Hopper and later)
_FP8_NATIVE_MIN_CAPABILITY = (8, 9)

@dataclass
class BlockOperands:
    """Kernel arguments of a block-format weight: views of the stored tensors plus static facts."""

    kind: int              # triton_gemv kind code
    words: torch.Tensor    # int32 view of the codes, [N, KW]
    codes: torch.Tensor    # the codes as stored (uint8 [N, K/2], int8 [N, K], or a two-plane format's low plane)
    scales: torch.Tensor   # fp16 [N, K / block]
    mins: torch.Tensor     # fp16 [N, K/32] (asym) or scales (unused)
    qh: torch.Tensor       # int32 view of the 5th bits (int5, [N, K/32]), the high plane (two-plane codebooks) or words
    table: torch.Tensor    # float32 code values (codebooks) or scales (unused)
    gemv_table: torch.Tensor  # what the GEMV looks codes up in: a pair table (pair_table) or `table`
    in_features: int
    scale_shift_blocks: int  # log2(32-blocks per scale)
    words_per_row: int
    blocks_per_row: int
    plans: dict = field(default_factory=dict)  # (rows, dtype) -> (launcher, config), filled on first use
    subnormal: bool = False  # the GEMV reads codes in place as float32 bit patterns (triton_gemv, SUBNORMAL)

    def _tables(self, scales: torch.Tensor) -> dict[str, torch.Tensor]:
        """`table` and `gemv_table` of a copy whose scales are `scales`: a codebook's tables have no rows, so the copy
        shares them; other kinds leave them unused, aliasing the scales (block_operands)."""
        if self.kind in CODEBOOK_KINDS:
            return {"table": self.table, "gemv_table": self.gemv_table}
        return {"table": scales, "gemv_table": scales}

    def row_band(self, start: int, rows: int) -> "BlockOperands":
        """The operands of output rows [start, start + rows) (views)."""
        end = start + rows
        scales = self.scales[start:end]
        # unused operands alias the scales or words (block_operands)
        return replace(self, words=self.words[start:end], codes=self.codes[start:end], scales=scales,
                       mins=scales if self.mins is self.scales else self.mins[start:end], qh=self.qh[start:end],
                       plans={}, **self._tables(scales))

    def replica(self) -> "BlockOperands":
        """A copy of the tensors the kernels read, aliases kept (autotuning rotates replicas so weights come from
        memory, not L2)."""
        words = self.words.clone()
        scales = self.scales.clone()
        return replace(self, words=words, scales=scales, mins=scales if self.mins is self.scales else self.mins.clone(),
                       qh=words if self.qh is self.words else self.qh.clone(), plans={}, **self._tables(scales))

    def nbytes(self) -> int:
        """Bytes of weight a GEMV reads (codes, 5th bits or high plane, scales, mins)."""
        tensors = {id(t): t for t in (self.words, self.qh, self.scales, self.mins)}
        return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Fp8Operands:
    qweight: torch.Tensor  # float8 [N, K] (native) or its uint8 view
    scales: torch.Tensor   # float32 [N]
    e5m2: bool
    native: bool
    in_features: int
    plans: dict = field(default_factory=dict)

    def row_band(self, start: int, rows: int) -> "Fp8Operands":
        """The operands of output rows [start, start + rows) (views)."""
        return replace(self, qweight=self.qweight[start:start + rows], scales=self.scales[start:start + rows],
                       plans={})

    def replica(self) -> "Fp8Operands":
        """A copy of the tensors the kernels read (see BlockOperands.replica)."""
        return replace(self, qweight=self.qweight.clone(), scales=self.scales.clone(), plans={})

    def nbytes(self) -> int:
        """Bytes of weight a GEMV reads."""
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * 4


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(fmt: CodebookFormat, device: torch.device) -> torch.Tensor:
    key = (fmt.name, device)
    if key not in _TABLES:
        _TABLES[key] = fmt.values.to(device=device, dtype=torch.float32).contiguous()
    return _TABLES[key]


_PAIR_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def pair_table(fmt: CodebookFormat, device: torch.device) -> torch.Tensor:
    """int64 [64] for a two-plane 3-bit codebook (CB3): entry first | second << 3 holds the float32 bits of two
    neighbouring codes' values, the first code's in the low half, so the GEMV reads two codes with one load
    (triton_gemv_planes)."""
    key = (fmt.name, device)
    if key not in _PAIR_TABLES:
        i = torch.arange(64)
        first, second = i & 7, i >> 3
        bits = fmt.values.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        _PAIR_TABLES[key] = (bits[first] | (bits[second] << 32)).to(device).contiguous()
    return _PAIR_TABLES[key]


def block_kind(fmt: LowBitFormat) -> int | None:
    """Kernel kind code of a format the block kernels read, else None."""
    if isinstance(fmt, GgmlBlockFormat):
        if fmt.bits == 8:
            return G.Q8_SYM.value
        if fmt.bits == 4:
            return (G.Q4_SYM if fmt.symmetric else G.Q4_ASYM).value
        if fmt.bits == 5:
            return (G.Q5_SYM if fmt.symmetric else G.Q5_ASYM).value
    if isinstance(fmt, CodebookFormat) and fmt.block_size in (32, 64):
        return _CODEBOOK_KINDS.get(tuple(bits for _, bits in fmt.planes))
    return None


# plane bits (low plane first) -> kind, for the codebook layouts the kernels read
_CODEBOOK_KINDS = {(4,): G.CB4.value, (2, 1): G.CB3.value, (4, 2): G.CB6.value}
CODEBOOK_KINDS = frozenset(_CODEBOOK_KINDS.values())
PLANE_KINDS = frozenset({G.CB3.value, G.CB6.value})
# codes per int32 word of the (low) plane the kernels walk
_CODES_PER_WORD = {G.Q8_SYM.value: 4, G.CB3.value: 16}


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def block_operands(fmt: LowBitFormat, parts: Parts) -> BlockOperands:
    """The kernel operands of a block-format weight (views, no copies of contiguous parts)."""
    kind = block_kind(fmt)
    if kind is None:
        raise ValueError(f"format {fmt.name} has no Triton block kernel")
    low, high = (fmt.planes[0][0], fmt.planes[1][0]) if kind in PLANE_KINDS else ("qweight", "qhigh")
    codes = _contig(parts[low])
    n = codes.shape[0]
    words = codes.view(torch.int32)
    scales = _contig(parts["scales"])
    per_word = _CODES_PER_WORD.get(kind, 8)
    k = words.shape[1] * per_word
    block = fmt.block_size
    mins = _contig(parts["mins"]) if "mins" in parts else scales
    has_high = kind in PLANE_KINDS or kind in (G.Q5_SYM.value, G.Q5_ASYM.value)
    qh = _contig(parts[high]).view(torch.int32) if has_high else words
    table = _table(fmt, codes.device) if kind in CODEBOOK_KINDS else scales  # type: ignore[arg-type]
    assert words.shape == (n, k // per_word) and scales.shape == (n, k // block)
    subnormal = reads_codes_in_place(fmt, kind) and keeps_subnormals(codes.device)
    # nf3's GEMV looks its codes up two at a time (pair_table)
    gemv_table = pair_table(fmt, codes.device) if kind == G.CB3.value else table  # type: ignore[arg-type]
    return BlockOperands(kind, words, codes, scales, mins, qh, table, gemv_table, k, int(math.log2(block // 32)),
                         k // per_word, k // 32, subnormal=subnormal)


@triton.jit
def subnormal_probe_kernel(bits_ptr, x_ptr, acc_ptr, out_ptr):
    """out = bits read as a float32 * x + acc: the product the SUBNORMAL GEMV forms, for the host to check that a
    subnormal operand survives it on a device."""
    f = tl.load(bits_ptr).to(tl.float32, bitcast=True)
    tl.store(out_ptr, f * tl.load(x_ptr) + tl.load(acc_ptr))


# kinds whose GEMV can read codes as float32 subnormals (triton_gemv, SUBNORMAL)
SUBNORMAL_KINDS = frozenset({G.Q4_SYM.value, G.Q4_ASYM.value, G.Q8_SYM.value})
_KEEPS_SUBNORMALS: dict[torch.device, bool] = {}
# codebook kinds whose GEMV reads a float format's codes in place, and the one table each does that for
_IN_PLACE_TABLES = {G.CB4.value: minifloat_values(exp_bits=2, man_bits=1, bias=1),   # e2m1 (fp4)
                    G.CB6.value: minifloat_values(exp_bits=3, man_bits=2, bias=3)}   # e3m2 (fp6)


def reads_codes_in_place(fmt: LowBitFormat, kind: int) -> bool:
    """Whether the GEMV can read this format's codes in place as float32 bit patterns (triton_gemv, SUBNORMAL):
    the integer kinds of SUBNORMAL_KINDS, and codebooks whose table is the float format the kernel decodes."""
    if kind in SUBNORMAL_KINDS:
        return True
    return isinstance(fmt, CodebookFormat) and fmt.values.tolist() == _IN_PLACE_TABLES.get(kind)


def shuffles_codes(kind: int, subnormal: bool) -> bool:
    """Whether the GEMV looks this kind's codes up by warp shuffles where the device has them (lane_lookup, LANES):
    the table lookups, nf4 and nf3; fp4's codes read in place stay faster read in place."""
    return kind in (G.CB4.value, G.CB3.value) and not subnormal


def reads_activation_tile(kind: int, subnormal: bool, lanes: bool) -> bool:
    """Whether the decode GEMV reads a step's activations as one tile (X_TILE): with codes looked up by warp
    shuffles (lanes: nf4, nf3), and fp6's codes read in place."""
    return lanes or (kind == G.CB6.value and subnormal)


def keeps_subnormals(device: torch.device) -> bool:
    """Whether Triton kernels on the device keep float32 subnormal operands of a multiply-add (probed once: some
    parts or compilers flush them to zero, which would zero the subnormal-coded GEMV's low codes)."""
    if device.type not in ("cuda", "xpu") and not _interpreting():
        return False
    if device not in _KEEPS_SUBNORMALS:
        if capturing(device):
            return False  # no launch inside a graph: weights set up now keep the old decoding; later calls probe
        bits = torch.tensor([15 << 4], dtype=torch.int32, device=device)  # 240 * 2**-149, a subnormal
        x = torch.tensor([2.0 ** 40], dtype=torch.float32, device=device)
        acc = torch.zeros(1, dtype=torch.float32, device=device)
        out = torch.empty(1, dtype=torch.float32, device=device)
        subnormal_probe_kernel[(1,)](bits, x, acc, out, enable_fp_fusion=True)  # a fused multiply-add, as the GEMV's
        _KEEPS_SUBNORMALS[device] = out.item() == 240 * 2.0 ** -109
    return _KEEPS_SUBNORMALS[device]


def fp8_native(device: torch.device) -> bool:
    """Whether Triton converts float8 in hardware on this device (CUDA sm_89+); else the kernels decode bits."""
    if device.type != "cuda" or _interpreting():
        return False
    return torch.cuda.get_device_capability(device) >= _FP8_NATIVE_MIN_CAPABILITY


def fp8_operands(fmt: Float8Format, parts: Parts) -> Fp8Operands:
    q = _contig(parts["qweight"])
    native = fp8_native(q.device)
    return Fp8Operands(q if native else q.view(torch.uint8), _contig(parts["scales"].reshape(-1).float()),
                       fmt.dtype == torch.float8_e5m2, native, q.shape[1])
