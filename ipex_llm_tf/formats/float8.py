"""FP8 formats: torch's native float8 weight with one float32 scale per output channel."""
from __future__ import annotations

import torch

from . import register_format
from .base import DtypeFormat, PartSpecs, Parts
from .codebooks import chunk_rows, cpu_fast_path, empty_output


class Float8Format(DtypeFormat):
    """Per-output-channel absmax scaling into a torch float8 dtype, saturating at the dtype's max."""

    # Storage is 8 bits plus 32/in_features for the row scale; that depends on the shape, so the
    # table reports the element cost only (the description says so).
    bits_per_weight = 8.0

    def __init__(self, name: str, dtype: torch.dtype, description: str) -> None:
        super().__init__(name, dtype, description)
        self.max_value = float(torch.finfo(dtype).max)

    def part_specs(self, out_features: int, in_features: int) -> PartSpecs:
        """qweight [N, K] in the float8 dtype and scales float32 [N, 1]."""
        self.check_shape(out_features, in_features)
        return {"qweight": ((out_features, in_features), self.dtype),
                "scales": ((out_features, 1), torch.float32)}

    def quantize(self, weight: torch.Tensor) -> Parts:
        """Scale each row so its absmax hits the float8 max, then round to float8."""
        self.check_weight(weight)
        x = weight.to(torch.float32)
        absmax = x.abs().amax(dim=1, keepdim=True)
        # A tensor divisor keeps CPU and CUDA bit-identical (CUDA multiplies by the reciprocal of a
        # Python-float divisor, off by an ulp at times).
        scales = absmax / torch.full_like(absmax, self.max_value)
        # All-zero rows keep scale 0 and divide by 1 instead, giving exact zeros rather than NaN.
        y = x / torch.where(scales > 0, scales, torch.ones_like(scales))
        # Clamp first: the cast does not saturate (e4m3fn overflows to NaN, e5m2 to Inf), and x/scale
        # can land an ulp past the max.
        qweight = y.clamp(-self.max_value, self.max_value).to(self.dtype)
        return {"qweight": qweight, "scales": scales}

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """float8 values times their row scale, in `dtype`."""
        qweight, scales = parts["qweight"], parts["scales"].to(torch.float32)
        if not cpu_fast_path(parts):
            return (qweight.to(torch.float32) * scales).to(dtype)
        # torch's float8 -> float32 cast is scalar code (~5 ns a weight). Instead, a chunk of rows at a time, shift
        # each bit pattern into an fp16 with the same value (e5m2) or the value / 256 (e4m3fn), cast that with the
        # vectorized fp16 cast and multiply in float32: the same values, the same single rounding.
        n, k = qweight.shape
        rows = chunk_rows(n, k)
        codes = qweight.contiguous().view(torch.int8)
        e4m3 = self.dtype == torch.float8_e4m3fn
        after = 1.0
        if e4m3:  # fold the 2**8 into the scales (exact) unless that would overflow one
            scales, after = (scales * 256.0, 1.0) if bool((scales.abs() < 2.0 ** 100).all()) else (scales, 256.0)
        out = empty_output((n, k), dtype)
        staging = None if dtype == torch.float32 else torch.empty(rows, k, dtype=torch.float32)
        half = torch.empty(rows, k, dtype=torch.int16)
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            dst = out[r0:r0 + r] if staging is None else staging[:r]
            h = half[:r]
            h.copy_(codes[r0:r0 + r])  # sign-extends
            if e4m3:  # s eeee mmm -> fp16 s 0eeee mmm0000000 (the sign extension also set bit 14: clear it)
                h.bitwise_left_shift_(7).bitwise_and_(~0x4000)
            else:  # s eeeee mm -> fp16 s eeeee mm00000000
                h.bitwise_left_shift_(8)
            dst.copy_(h.view(torch.float16))
            if e4m3:
                self._restore_nans(dst)
                if after != 1.0:
                    dst.mul_(after)
            dst.mul_(scales[r0:r0 + r])
            if staging is not None:
                out[r0:r0 + r].copy_(dst)
        return out

    def _restore_nans(self, values: torch.Tensor) -> None:
        """Give e4m3fn's NaN codes, which the fp16 decode above reads as +-1.875, torch's NaN bit patterns."""
        # Every other code decodes to at most 448 / 256 = 1.75 in magnitude, so one min/max pass tells.
        low, high = torch.aminmax(values)
        if float(high) <= 1.75 and float(low) >= -1.75:
            return
        nan = values.abs() == 1.875
        bits = values.view(torch.int32)
        cast = torch.tensor([0x7F, 0xFF], dtype=torch.uint8).view(self.dtype).to(torch.float32).view(torch.int32)
        bits.masked_fill_(nan & (bits >= 0), int(cast[0]))
        bits.masked_fill_(nan & (bits < 0), int(cast[1]))


register_format(Float8Format(
    "fp8_e4m3", torch.float8_e4m3fn,
    "FP8 e4m3fn [N, K] + float32 absmax/448 scale per output channel (+32/K bits)"))
register_format(Float8Format(
    "fp8_e5m2", torch.float8_e5m2,
    "FP8 e5m2 [N, K] + float32 absmax/57344 scale per output channel (+32/K bits)"))
