"""SiLU(gate) * up from one [gate | up] tensor as one Triton kernel; reference: silu_and_mul_reference.

Rounds where PyTorch's two eager ops round (SiLU's result to the input dtype, then the product), so the fused op
differs from the reference only by the sigmoid's last-bit rounding. Plain tl ops: runs on CUDA, XPU, interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grids import cdiv, next_power_of_2
from .launch_overlap import overlap_options, release_next, wait_previous


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, half, x_row_stride, out_row_stride, BLOCK: tl.constexpr,
                     OVERLAP: tl.constexpr = False):
    release_next(OVERLAP)
    wait_previous(OVERLAP)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < half
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0)
    up = tl.load(x_ptr + row * x_row_stride + half + cols, mask=inside, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    y = (silu.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + cols, y, mask=inside)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] holding [gate | up] -> [..., I]."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"silu_and_mul needs an even last dim holding [gate | up], got {width}")
    rows = gate_up.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    half = width // 2
    out = torch.empty((rows.shape[0], half), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, next_power_of_2(half))
    if rows.shape[0]:
        _silu_mul_kernel[(rows.shape[0], cdiv(half, block))](rows, out, half, rows.stride(0), out.stride(0),
                                                                    BLOCK=block, enable_fp_fusion=True,
                                                                    **overlap_options(out.device))
    return out.view(*gate_up.shape[:-1], half)
