"""GGML's classic 32-weight block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), byte-exact with gguf-py.

Each block of 32 weights along a row keeps an fp16 scale (plus an fp16 minimum for the asymmetric
variants) and 4, 5 or 8-bit codes. The stored tensors are plain per-kind arrays rather than ggml's
interleaved structs so that kernels can load codes and scales with simple strided reads:

  qweight  uint8 [N, K/2]  block b: byte b*16+j = element b*32+j (low nibble) | b*32+j+16 (high nibble)
           int8  [N, K]    (8-bit formats: the codes themselves)
  qhigh    uint8 [N, K/8]  5-bit formats: per block, ggml's little-endian uint32 of 5th bits
  scales   fp16  [N, K/32]
  mins     fp16  [N, K/32] asymmetric formats only

Quantization reproduces gguf.quants step by step in float32. Every step is its own torch op (no
fused multiply-add, no division turned into multiplication by a reciprocal) because a single
different rounding changes a code and breaks byte equality with files written by llama.cpp tools.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from . import register_format
from .base import FormatError, LowBitFormat, PartSpecs, Parts

QK = 32  # weights per block, fixed by the GGML formats


def _exact_div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor rounded once, as numpy does."""
    # A Python scalar divisor lets CUDA compute x * (1/divisor), which rounds twice.
    return x / torch.full_like(x, divisor)


def _safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """1/d, with 0 where d is zero (gguf's `where(d == 0, 0, 1 / d)`)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))


def _to_codes(q: torch.Tensor, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Clamp float codes to [lo, hi] and cast; non-finite values become 0 as numpy's x86 cast does."""
    # Only blocks whose scale is a float32 subnormal reach here with inf/NaN (1/d overflows);
    # numpy's cast turns those into 0, and a well-defined cast must not depend on the device.
    q = torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0)
    return q.clamp_(lo, hi).to(dtype)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """gguf's np_roundf: floor(|v|) + floor(2 * frac(|v|)), with v's sign."""
    a = v.abs()
    floored = a.floor()
    return torch.sign(v) * (floored + (2 * (a - floored)).floor())


# byte b -> 8 bytes, byte t = bit t of b moved to bit 4: the 5th bit of 8 codes at once
_HIGH_BIT_SPREAD = (((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1) << 4).to(torch.uint8).view(torch.int64)
_HIGH_BIT_SPREAD = _HIGH_BIT_SPREAD.reshape(256)


def _dequantize_int8(q: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Q8_0: d * q in float32, chunk by chunk of rows, into out (cast to its dtype)."""
    n, k = out.shape
    rows = chunk_rows(n, k)
    d = d.to(torch.float32).unsqueeze(-1)
    staging = None if out.dtype == torch.float32 else torch.empty(rows, k, dtype=torch.float32)
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        dst = out[r0:r0 + r] if staging is None else staging[:r]
        dst.copy_(q[r0:r0 + r])  # int8 -> float32: exact
        dst.view(r, -1, QK).mul_(d[r0:r0 + r])
        if staging is not None:
            out[r0:r0 + r].copy_(dst)
    return out


class GgmlBlockFormat(LowBitFormat):
    """One of ggml's 32-weight block formats, parametrized by bit width and (a)symmetry."""

    block_size = QK

    def __init__(self, name: str, qtype: GGMLQuantizationType, bits: int, symmetric: bool,
                 description: str) -> None:
        if bits not in (4, 5, 8) or (bits == 8 and not symmetric):
            raise ValueError(f"no ggml block format with bits={bits}, symmetric={symmetric}")
        self.name = name
        self.gguf_type = int(qtype)
        self.bits = bits
        self.symmetric = symmetric
        self.description = description
        self.levels = 1 << bits
        # ggml block order: d, [m], [qh], qs; (part name, dtype, bytes per block)
        code_dtype = torch.int8 if bits == 8 else torch.uint8
        layout = [("scales", torch.float16, 2)]
        if not symmetric:
            layout.append(("mins", torch.float16, 2))
        if bits == 5:
            layout.append(("qhigh", torch.uint8, 4))
        layout.append(("qweight", code_dtype, QK if bits == 8 else QK // 2))
        self.layout: list[tuple[str, torch.dtype, int]] = layout
        self.type_size = sum(nbytes for _, _, nbytes in layout)
        self.bits_per_weight = self.type_size * 8 / QK

    def part_specs(self, out_features: int, in_features: int) -> PartSpecs:
        """Shape and dtype of every stored tensor for a weight of this size."""
        blocks = in_features // QK
        return {name: ((out_features, blocks * nbytes // dtype.itemsize), dtype)
                for name, dtype, nbytes in self.layout}

    # -- quantization -----------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, *, where: str = "weight") -> Parts:
        """Pack a float [out, in] weight into codes and fp16 scales (on the weight's device)."""
        self.check_weight(weight, where)
        n, k = weight.shape
        x = weight.to(torch.float32).reshape(n, k // QK, QK)
        parts: Parts = {}
        if self.bits == 8:
            d = _exact_div(x.abs().amax(dim=-1, keepdim=True), 127.0)
            q = _round_half_away(x * _safe_reciprocal(d))
            codes = _to_codes(q, -128, 127, torch.int8)
        elif self.symmetric:
            # The scale keeps the sign of the largest-magnitude value so that it maps to code 0.
            half = self.levels // 2
            imax = x.abs().argmax(dim=-1, keepdim=True)  # first index on ties, like numpy
            d = _exact_div(torch.gather(x, -1, imax), float(-half))
            q = torch.trunc(x * _safe_reciprocal(d) + (half + 0.5))
            codes = _to_codes(q, 0, self.levels - 1, torch.uint8)
        else:
            # First occurrence, as ggml's C loop picks it: amin/amax choose between +0.0 and -0.0
            # by reduction order (numpy too), which flips the sign bit of a stored zero min/scale.
            lo = torch.gather(x, -1, x.argmin(dim=-1, keepdim=True))
            hi = torch.gather(x, -1, x.argmax(dim=-1, keepdim=True))
            d = _exact_div(hi - lo, float(self.levels - 1))
            q = torch.trunc((x - lo) * _safe_reciprocal(d) + 0.5)
            codes = _to_codes(q, 0, self.levels - 1, torch.uint8)
            parts["mins"] = lo.reshape(n, -1).to(torch.float16)
        parts["scales"] = d.reshape(n, -1).to(torch.float16)
        parts.update(self._pack_codes(codes))
        return {name: parts[name] for name, _, _ in self.layout}

    def _pack_codes(self, codes: torch.Tensor) -> Parts:
        """Split codes [N, B, 32] into the stored qweight (and qhigh) tensors."""
        n = codes.shape[0]
        if self.bits == 8:
            return {"qweight": codes.reshape(n, -1)}
        low = codes & 0x0F
        packed = {"qweight": (low[..., : QK // 2] | (low[..., QK // 2:] << 4)).reshape(n, -1)}
        if self.bits == 5:
            shifts = torch.arange(8, dtype=torch.int32, device=codes.device)
            high = ((codes >> 4) & 1).to(torch.int32).reshape(*codes.shape[:2], 4, 8)
            packed["qhigh"] = (high << shifts).sum(dim=-1).to(torch.uint8).reshape(n, -1)
        return packed

    def codes(self, parts: Parts) -> torch.Tensor:
        """Unpacked integer codes [N, B, 32]: int8 for 8 bits, else uint8 in [0, 2**bits)."""
        qweight = parts["qweight"]
        n = qweight.shape[0]
        if self.bits == 8:
            return qweight.reshape(n, -1, QK)
        qs = qweight.reshape(n, -1, QK // 2)
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
        if self.bits == 5:
            shifts = torch.arange(8, dtype=torch.uint8, device=qs.device)
            qh = parts["qhigh"].reshape(n, -1, 4, 1)
            codes = codes | (((qh >> shifts) & 1) << 4).reshape(n, -1, QK)
        return codes

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rebuild the [out, in] weight; float32 math in gguf's order, then cast to `dtype`."""
        if cpu_fast_path(parts):
            return self._dequantize_cpu(parts, dtype)
        q = self.codes(parts).to(torch.float32)
        n = q.shape[0]
        d = parts["scales"].to(torch.float32).unsqueeze(-1)
        if self.bits == 8:
            w = d * q
        elif self.symmetric:
            w = d * (q - self.levels // 2)
        else:
            w = d * q + parts["mins"].to(torch.float32).unsqueeze(-1)
        return w.reshape(n, -1).to(dtype)

    def _dequantize_cpu(self, parts: Parts, dtype: torch.dtype) -> torch.Tensor:
        """dequantize on CPU through codebooks' chunked engine: codes unpacked, then gguf's float32 math."""
        d = parts["scales"]
        n, k = d.shape[0], d.shape[1] * QK
        if self.bits == 8:
            return _dequantize_int8(parts["qweight"], d, empty_output((n, k), dtype))
        low = _byte_rows(parts["qweight"])
        high = _byte_rows(parts["qhigh"]) if self.bits == 5 else None

        def fill(codes: torch.Tensor, scratch: torch.Tensor, r0: int) -> None:
            r = codes.shape[0]
            _unpack_into(codes, low[r0:r0 + r], 4)
            if high is not None:  # 5th bits: qhigh's bytes, bit t = element 8 * byte + t, spread to bytes
                index = scratch[:, :k].view(torch.int64)
                spread = scratch[:, k:].view(torch.int64)
                index.copy_(high[r0:r0 + r])
                torch.gather(_HIGH_BIT_SPREAD.expand(r, 256), 1, index, out=spread)
                codes.view(torch.int64).bitwise_or_(spread)

        # gguf's d * (q - 16) or d * q + m: q - 16 is exact in float32, then the same roundings
        return _dequantize_codes(n, k, dtype, fill, QK, d, None if self.symmetric else parts["mins"],
                                 offset=self.levels // 2 if self.symmetric else 0)

    # -- GGUF interchange -------------------------------------------------------------------
    def to_gguf_blocks(self, parts: Parts) -> torch.Tensor:
        """GGUF block bytes [out, in / 32 * type_size] (uint8) of the packed tensors."""
        # Byte views are native-endian; GGUF is little-endian, as are all supported devices.
        n, b = parts["scales"].shape
        fields = [parts[name].contiguous().view(torch.uint8).reshape(n, b, nbytes)
                  for name, _, nbytes in self.layout]
        return torch.cat(fields, dim=-1).reshape(n, b * self.type_size)

    def from_gguf_blocks(self, raw: torch.Tensor | bytes | bytearray | memoryview,
                         out_features: int, in_features: int) -> Parts:
        """Packed tensors from GGUF block bytes (a [out, bytes] tensor or flat bytes), lossless."""
        self.check_shape(out_features, in_features, "gguf tensor")
        if isinstance(raw, (bytes, bytearray, memoryview)):
            raw = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        raw = raw.reshape(-1).view(torch.uint8)
        b = in_features // QK
        if raw.numel() != out_features * b * self.type_size:
            raise FormatError(
                f"gguf tensor: {raw.numel()} bytes do not hold a {self.name} weight of shape "
                f"({out_features}, {in_features}), which needs {out_features * b * self.type_size}; "
                f"check the tensor's type and shape in the GGUF header.")
        fields = raw.reshape(out_features, b, self.type_size).split([nb for _, _, nb in self.layout], -1)
        return {name: f.contiguous().view(dtype).reshape(out_features, -1)
                for (name, dtype, _), f in zip(self.layout, fields)}


Q = GGMLQuantizationType
for _fmt in (
    GgmlBlockFormat("sym_int4", Q.Q4_0, 4, True, "4-bit codes, fp16 scale per 32 (ggml Q4_0)"),
    GgmlBlockFormat("asym_int4", Q.Q4_1, 4, False, "4-bit codes, fp16 scale and min per 32 (ggml Q4_1)"),
    GgmlBlockFormat("sym_int5", Q.Q5_0, 5, True, "5-bit codes, fp16 scale per 32 (ggml Q5_0)"),
    GgmlBlockFormat("asym_int5", Q.Q5_1, 5, False, "5-bit codes, fp16 scale and min per 32 (ggml Q5_1)"),
    GgmlBlockFormat("sym_int8", Q.Q8_0, 8, True, "8-bit codes, fp16 scale per 32 (ggml Q8_0)"),
):
    register_format(_fmt)
del Q, _fmt

# The CPU dequantize shares codebooks' machinery. Imported last: importing codebooks registers its formats, and
# the registry lists these ggml formats first.
from .codebooks import (_byte_rows, _dequantize_codes, _unpack_into, chunk_rows, cpu_fast_path,  # noqa: E402
                        empty_output)
