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


def rope_angles_reference(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [*positions.shape, 2 * len(inv_freq)] as transformers' Llama rotary embedding computes them."""
    angles = positions[..., None].float() * inv_freq.float()
    doubled = torch.cat((angles, angles), dim=-1)
    return (doubled.cos() * scaling).to(dtype), (doubled.sin() * scaling).to(dtype)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for x [batch, heads, seq, head_dim] from cos/sin [batch, seq, head_dim], transformers' rotate_half pairing."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor | None,
                               scale: float, kv_scales: "tuple[torch.Tensor, torch.Tensor] | None" = None
                               ) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [B, H, 1, D] over k, v [B, H_kv, S, D], keys masked by key_ok [B, S] (bool);
    float8 k, v are codes times their kv_scales ([B, H_kv, S, 1] each)."""
    if kv_scales is not None:
        k, v = dequantize_kv_vectors(k, kv_scales[0], q.dtype), dequantize_kv_vectors(v, kv_scales[1], q.dtype)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = None if key_ok is None else key_ok.bool()[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def quantize_kv_vectors(states: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of keys or values [..., D] in float8 with one float32 scale per vector (max |x| / fp8 max)."""
    fp8_max = torch.finfo(dtype).max
    # clamp_min: an all-zero vector would otherwise give a zero scale and 0/0 codes
    scale = states.abs().amax(dim=-1, keepdim=True).float().clamp_min(torch.finfo(torch.float32).tiny) / fp8_max
    # one float32 copy of the states, divided in place (copy=True: float32 states must not be changed under the caller)
    return states.to(torch.float32, copy=True).div_(scale).to(dtype), scale


def dequantize_kv_vectors(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values from quantize_kv_vectors' codes and per-vector scales, in `dtype`."""
    return (codes.float() * scales).to(dtype)


def next_greedy_inputs_reference(logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                                 key_ok: torch.Tensor, slot: torch.Tensor, length: int,
                                 copy_to: torch.Tensor | None = None) -> None:
    """A greedy decode step's inputs for the next token, in place: each row's argmax token, its position plus one,
    the key at `length` made visible, and the cache slot set to `length`; the logits copied into copy_to if given."""
    if copy_to is not None:
        copy_to.copy_(logits)
    torch.argmax(logits, dim=-1, keepdim=True, out=ids)
    positions.add_(1)
    key_ok[:, length] = True
    slot.fill_(length)
