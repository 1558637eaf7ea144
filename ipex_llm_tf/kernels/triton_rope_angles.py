"""RoPE's cos / sin rows for given positions as one Triton kernel; reference: kernels.reference.rope_angles_reference.

transformers' rotary embeddings (Llama and its twins) compute them as ~9 elementwise kernels (the position cast, the
product with the inverse frequencies, a concatenation, cos, sin, two scalings, two casts). In a graph decode step of
a 7B model on an H100 this kernel in their place took the step from 2.0151 to 1.9983 ms (docs/gpu-log.md, session
22).

Numerics follow transformers: angle = float32(position) * inv_freq in float32, cos and sin in float32 (tl.cos and
tl.sin are libdevice's cosf / sinf on CUDA, the functions PyTorch's CUDA kernels call), times attention_scaling,
rounded once to the output dtype; the second half of each row repeats the first. Plain tl ops: CUDA, XPU and the
interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grids import next_power_of_2


@triton.jit
def _rope_angles_kernel(pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, scaling, HALF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    inside = lanes < HALF
    angle = tl.load(pos_ptr + row).to(tl.float32) * tl.load(inv_freq_ptr + lanes, mask=inside, other=0.0)
    cos = (tl.cos(angle) * scaling).to(cos_ptr.dtype.element_ty)
    sin = (tl.sin(angle) * scaling).to(sin_ptr.dtype.element_ty)
    out = row * (2 * HALF) + lanes
    tl.store(cos_ptr + out, cos, mask=inside)
    tl.store(cos_ptr + out + HALF, cos, mask=inside)
    tl.store(sin_ptr + out, sin, mask=inside)
    tl.store(sin_ptr + out + HALF, sin, mask=inside)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [*positions.shape, 2 * len(inv_freq)] in `dtype` for integer positions and float32 inverse
    frequencies on one device."""
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"rope_angles takes integer positions, got {positions.dtype}")
    if inv_freq.dim() != 1 or inv_freq.dtype != torch.float32 or inv_freq.device != positions.device:
        raise ValueError(f"rope_angles takes float32 inverse frequencies [D / 2] on the positions' device, got "
                         f"{tuple(inv_freq.shape)} {inv_freq.dtype} on {inv_freq.device}")
    half = inv_freq.shape[0]
    shape = (*positions.shape, 2 * half)
    cos = torch.empty(shape, dtype=dtype, device=positions.device)
    sin = torch.empty(shape, dtype=dtype, device=positions.device)
    rows = positions.numel()
    if rows and half:
        _rope_angles_kernel[(rows,)](positions.contiguous(), inv_freq.contiguous(), cos, sin, float(scaling),
                                     HALF=half, BLOCK=next_power_of_2(half), num_warps=1)
    return cos, sin
