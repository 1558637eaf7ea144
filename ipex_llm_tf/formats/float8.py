"""FP8 formats: torch's native float8 weight with one float32 scale per output channel."""
from __future__ import annotations

import torch

from . import register_format
from .base import LowBitFormat, PartSpecs, Parts


class Float8Format(LowBitFormat):
    """Per-output-channel absmax scaling into a torch float8 dtype, saturating at the dtype's max."""

    block_size = 1
    # Storage is 8 bits plus 32/in_features for the row scale; that depends on the shape, so the
    # table reports the element cost only (the description says so).
    bits_per_weight = 8.0
    version = 1
    gguf_type = None

    def __init__(self, name: str, dtype: torch.dtype, description: str) -> None:
        self.name = name
        self.dtype = dtype
        self.max_value = float(torch.finfo(dtype).max)
        self.description = description

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
        return (parts["qweight"].to(torch.float32) * parts["scales"].to(torch.float32)).to(dtype)


register_format(Float8Format(
    "fp8_e4m3", torch.float8_e4m3fn,
    "FP8 e4m3fn [N, K] + float32 absmax/448 scale per output channel (+32/K bits)"))
register_format(Float8Format(
    "fp8_e5m2", torch.float8_e5m2,
    "FP8 e5m2 [N, K] + float32 absmax/57344 scale per output channel (+32/K bits)"))
