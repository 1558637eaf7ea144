"""Prefill's matmul for large M: the weight dequantized to a temporary in the activation dtype by a Triton kernel,
then torch's matmul (cuBLAS / oneDNN), which wins once the product is compute-bound (triton_linear's dispatch)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import triton_matmul as MM
from .grids import cdiv
from .triton_operands import BlockOperands, Fp8Operands


def dequantize_blocks(ops: BlockOperands, n: int, dtype: torch.dtype, block_n: int = 32,
                      blocks: int = 8) -> torch.Tensor:
    """The whole [N, K] weight of a block format in `dtype`, by one Triton kernel."""
    kb = ops.blocks_per_row
    out = torch.empty((n, ops.in_features), device=ops.codes.device, dtype=dtype)
    MM.dequant_blocks_kernel[(cdiv(n, block_n), cdiv(kb, blocks))](
        ops.codes, ops.scales, ops.mins, ops.qh, ops.table, out, n, kb,
        KIND=ops.kind, SBLK_SHIFT=ops.scale_shift_blocks, BLOCK_N=block_n, NB=blocks, EVEN=kb % blocks == 0,
        num_warps=4, enable_fp_fusion=False)  # no FMA: bit-identical to the format's own dequantize
    return out


# Prefill dequantizes a weight into a temporary in the activation dtype; a larger weight goes in bands of output rows,
# so that temporary (180 MB for a 7B gate_up projection in fp16) does not set the model's peak memory. The bound grows
# with the activation rows, as each band costs host time (a dequantize launch and a matmul; until session 23 also a
# copy into the output). H100, 7B sym_int4, per activation row (measured with the copy):  0 (32 MB bands):
# 1024-token first token 45 ms;  64 KB: 37 ms;  128 KB: 34 ms;  256 KB: 33 ms;
# peak of a 2k context prefilled in 512-token chunks with fp8 KV: 4.451 / 4.451 / 4.455 / 4.490 GiB.
DEQUANT_BAND_BYTES = 32 << 20
DEQUANT_BAND_BYTES_PER_ROW = 128 << 10


def _bands(ops: "BlockOperands | Fp8Operands", n: int, x: torch.Tensor) -> list:
    """(start, rows, operands) of the row bands x's matmul dequantizes one at a time; equal bands, cached."""
    limit = max(DEQUANT_BAND_BYTES, x.shape[0] * DEQUANT_BAND_BYTES_PER_ROW)
    count = -(-(n * ops.in_features * x.element_size()) // limit)
    per_band = -(-n // count)
    rows = max(64, -(-per_band // 64) * 64)
    key = ("bands", rows)
    if key not in ops.plans:
        ops.plans[key] = [(start, min(rows, n - start), ops.row_band(start, min(rows, n - start)))
                          for start in range(0, n, rows)]
    return ops.plans[key]


def _in_bands(x: torch.Tensor, ops: "BlockOperands | Fp8Operands", bias: torch.Tensor | None, n: int,
              dequantize: Callable) -> torch.Tensor:
    """x @ W.T + bias with W dequantized (by `dequantize(row_operands, rows)`) a band of rows at a time."""
    b = None if bias is None else bias.to(x.dtype)
    bands = _bands(ops, n, x)
    if len(bands) == 1:
        return F.linear(x, dequantize(ops, n), b)
    y = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
    for start, rows, band in bands:
        # straight into y's columns (BLAS takes an output whose rows are N apart): no temporary, no copy kernel
        weight, out = dequantize(band, rows).t(), y[:, start:start + rows]
        if b is None:
            torch.mm(x, weight, out=out)
        else:
            torch.addmm(b[start:start + rows], x, weight, out=out)
    return y


def dequant_matmul_blocks(x: torch.Tensor, ops: BlockOperands, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """Prefill fallback: dequantize to a temporary in x's dtype (in bands of rows), then torch's matmul."""
    return _in_bands(x, ops, bias, n, lambda o, rows: dequantize_blocks(o, rows, x.dtype))


def dequantize_fp8(ops: Fp8Operands, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole [N, K] fp8 weight times its row scales, in `dtype`, by one Triton kernel."""
    k = ops.in_features
    out = torch.empty((n, k), device=ops.qweight.device, dtype=dtype)
    MM.dequant_fp8_kernel[(cdiv(n, 16), cdiv(k, 256))](
        ops.qweight, ops.scales, out, n, k, E5M2=ops.e5m2, NATIVE=ops.native, BLOCK_N=16, BLOCK_K=256, num_warps=4,
        enable_fp_fusion=True)
    return out


def dequant_matmul_fp8(x: torch.Tensor, ops: Fp8Operands, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """Prefill fallback for fp8: the scaled weight in x's dtype (as the format dequantizes it), then torch's matmul.

    The scale must be applied before the matmul: codes times activations summed in fp16 can exceed its range."""
    return _in_bands(x, ops, bias, n, lambda o, rows: dequantize_fp8(o, rows, x.dtype))
