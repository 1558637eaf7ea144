"""PyTorch formulations of the fused-model ops with fewer dispatcher calls than the reference, equal to it bit for bit.

On the CPU a decode step is bound by per-op overhead (~1.5-3 us per call, ~90 of these ops per SmolLM2 token), not by
arithmetic, so the number of ops is what these save. The reference stays the obvious formula every kernel is tested
against; tests/test_torch_fast.py checks these against it with torch.equal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import rms_norm_reference, rotary_reference

# sin with its first half negated, for the last sin tensor seen: every layer of one forward gets the same (cos, sin)
_signed_sin: list = [None, None]


def _sin_with_sign(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    if torch.compiler.is_compiling():  # a compiled graph computes it once anyway; a cached global would be guarded on
        return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
    if _signed_sin[0] is not sin:
        _signed_sin[0], _signed_sin[1] = sin, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
    return _signed_sin[1]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotary_reference in three ops: x*cos + roll(x)*(±sin), where (-x2)*s == x2*(-s) exactly."""
    if x.shape[-1] % 2 or torch.is_grad_enabled():
        return rotary_reference(x, cos, sin)  # in-place steps below would break autograd; odd widths do not occur
    half = x.shape[-1] // 2
    return (x * cos.unsqueeze(1)).add_(x.roll(half, dims=-1).mul_(_sin_with_sign(sin)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_reference; all-float32 makes its cast between normalising and scaling a no-op, so torch's op is equal."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_reference(x, weight, eps)
