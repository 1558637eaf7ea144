"""Pure-PyTorch versions of every op: the portable path and the oracle every fast kernel is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import LowBitFormat, Parts


def linear_reference(x: torch.Tensor, fmt: LowBitFormat, parts: Parts, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ dequantize(W).T + b, computed in x's dtype (float32 for non-float inputs)."""
    compute_dtype = x.dtype if x.is_floating_point() else torch.float32
    weight = fmt.dequantize(parts, dtype=compute_dtype)
    return F.linear(x.to(compute_dtype), weight, None if bias is None else bias.to(compute_dtype))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Llama computes it: normalise in float32, scale in the input dtype."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a tensor holding [gate | up] along its last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for x [batch, heads, seq, head_dim] from cos/sin [batch, seq, head_dim], transformers' rotate_half pairing."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
