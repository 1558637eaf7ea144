"""Unquantized half-precision formats: the weight itself, cast to fp16 or bf16."""
from __future__ import annotations

import torch

from . import register_format
from .base import LowBitFormat, PartSpecs, Parts


class PlainFormat(LowBitFormat):
    """The weight stored as one tensor of a 16-bit float dtype."""

    block_size = 1
    bits_per_weight = 16.0
    version = 1
    gguf_type = None

    def __init__(self, name: str, dtype: torch.dtype, description: str) -> None:
        self.name = name
        self.dtype = dtype
        self.description = description

    def part_specs(self, out_features: int, in_features: int) -> PartSpecs:
        """weight [N, K] in this format's dtype."""
        self.check_shape(out_features, in_features)
        return {"weight": ((out_features, in_features), self.dtype)}

    def quantize(self, weight: torch.Tensor) -> Parts:
        """Cast to this format's dtype (shares storage when the weight already has it, saving a copy)."""
        self.check_weight(weight)
        return {"weight": weight.to(self.dtype).contiguous()}

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight cast to `dtype`."""
        return parts["weight"].to(dtype)


register_format(PlainFormat("fp16", torch.float16, "float16 [N, K], no scales"))
register_format(PlainFormat("bf16", torch.bfloat16, "bfloat16 [N, K], no scales"))
