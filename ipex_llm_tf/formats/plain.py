"""Unquantized half-precision formats: the weight itself, cast to fp16 or bf16."""
from __future__ import annotations

import torch

from . import register_format
from .base import DtypeFormat, PartSpecs, Parts
from .codebooks import chunk_rows, cpu_fast_path, empty_output


class PlainFormat(DtypeFormat):
    """The weight stored as one tensor of a 16-bit float dtype."""

    bits_per_weight = 16.0

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
        weight = parts["weight"]
        if not cpu_fast_path(parts) or weight.dtype == dtype or weight.dim() != 2:
            return weight.to(dtype)  # the stored tensor itself when the dtype already matches
        out = empty_output(tuple(weight.shape), dtype)
        if weight.element_size() != 2 or dtype.itemsize != 2:
            return out.copy_(weight)  # to or from float32: one vectorized cast
        # fp16 <-> bf16 is a scalar cast in torch (~1 ns a weight); two vectorized casts through float32, a chunk
        # of rows at a time, give the same values (the float32 step is exact) several times faster.
        n, k = weight.shape
        rows = chunk_rows(n, k)
        staging = torch.empty(rows, k, dtype=torch.float32)
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            staging[:r].copy_(weight[r0:r0 + r])
            out[r0:r0 + r].copy_(staging[:r])
            # The scalar cast writes every NaN as 0x7FC0, the vectorized float32 one as 0xFFFF: keep the former.
            # A NaN sum finds NaNs in a tenth of isnan()'s time (Inf - Inf just costs a needless masked fill).
            if dtype == torch.bfloat16 and bool(staging[:r].sum().isnan()):
                out[r0:r0 + r].masked_fill_(staging[:r].isnan(), float("nan"))
        return out


register_format(PlainFormat("fp16", torch.float16, "float16 [N, K], no scales"))
register_format(PlainFormat("bf16", torch.bfloat16, "bfloat16 [N, K], no scales"))
