"""Rotary position embedding (transformers' rotate_half pairing) as one Triton kernel; reference: rotary_reference.

x [batch, heads, seq, head_dim] may be any strided view (the q / k slices of a merged projection are); the output
is contiguous. Each product and the sum round to x's dtype as the reference's three eager ops do, so results match
it exactly. That needs the kernel compiled without floating-point contraction: with it, the sm_90 code computed one
product and the sum as one fused multiply-add (HFMA2 / FFMA), skipping the product's rounding. Plain tl ops: runs on
CUDA, XPU and the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grids import cdiv, next_power_of_2


@triton.jit
def rotate_halves(x1, x2, c1, c2, s1, s2):
    """x * cos + rotate_half(x) * sin on the halves of x, rotate_half(x) = [-x2 | x1], in x's dtype: each product
    rounds to x's dtype, the sum is taken in float32 and rounded (exact only in a kernel compiled without fusion)."""
    dt = x1.dtype
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    return y1.to(dt), y2.to(dt)


@triton.jit
def _kept_rounding(p, zero):
    """p unchanged, through an XOR of its bits with a run-time zero: a compiler with floating-point contraction on
    cannot see through it, so the rounding of the product p came from stays."""
    INT: tl.constexpr = tl.int16 if p.dtype.primitive_bitwidth == 16 else tl.int32
    return (p.to(INT, bitcast=True) ^ zero.to(INT)).to(p.dtype, bitcast=True)


@triton.jit
def rotate_whole(x, partner, c, s, first_half, zero):
    """rotate_halves for whole head vectors x (partner[i] = x[i + half] where first_half, else x[i - half]), with the
    same roundings in a kernel compiled with contraction on: zero must be a run-time 0 (see _kept_rounding)."""
    dt = x.dtype
    p1 = _kept_rounding((x * c).to(dt), zero)
    p2 = _kept_rounding((tl.where(first_half, -partner, partner) * s).to(dt), zero)
    return (p1.to(tl.float32) + p2.to(tl.float32)).to(dt)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, seq, sxb, sxh, sxs, scb, scs, half,
                   BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    pos = tl.program_id(0)                 # batch * seq + s
    b = (pos // seq).to(tl.int64)
    s = (pos % seq).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    inside = (h < heads) & (d < half)
    src = x_ptr + b * sxb + h * sxh + s * sxs + d
    x1 = tl.load(src, mask=inside, other=0.0)
    x2 = tl.load(src + half, mask=inside, other=0.0)
    trig = b * scb + s * scs + d
    on_d = d < half
    c1, c2 = tl.load(cos_ptr + trig, mask=on_d, other=0.0), tl.load(cos_ptr + trig + half, mask=on_d, other=0.0)
    s1, s2 = tl.load(sin_ptr + trig, mask=on_d, other=0.0), tl.load(sin_ptr + trig + half, mask=on_d, other=0.0)
    y1, y2 = rotate_halves(x1, x2, c1, c2, s1, s2)
    dst = out_ptr + ((b * heads + h) * seq + s) * (2 * half) + d
    tl.store(dst, y1, mask=inside)
    tl.store(dst + half, y2, mask=inside)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for x [batch, heads, seq, head_dim] from cos/sin [batch or 1, seq, head_dim]; contiguous output."""
    batch, heads, seq, dim = x.shape
    if dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {dim}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.to(x.dtype).expand(batch, seq, dim), sin.to(x.dtype).expand(batch, seq, dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((batch, heads, seq, dim), dtype=x.dtype, device=x.device)
    block_h = min(16, next_power_of_2(heads))
    if out.numel():
        _rotary_kernel[(batch * seq, cdiv(heads, block_h))](
            x, cos, sin, out, heads, seq, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
            dim // 2, BLOCK_D=next_power_of_2(dim // 2), BLOCK_H=block_h, enable_fp_fusion=False)
    return out
