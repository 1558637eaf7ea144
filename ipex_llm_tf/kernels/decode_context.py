"""What runs just before a layer's GEMV in a decode step, so that autotuning times its candidates where they run.

A decode GEMV reads its first weights before it waits for the previous kernel (launch_overlap). Behind a
latency-bound kernel, such as decode attention (a few microseconds of dependent loads that leave the memory bus
idle), a program that reads its whole K range in one step before the wait (triton_gemv's WHOLE) has all of its
weights in flight by the time the attention output exists. Timed back to back with itself, as autotuning times
other GEMVs, the same tile shows none of that, so a layer that knows its predecessor says so: the attention
patcher marks its output projection (`mark_after_attention`), and autotuning then times each candidate, whole-row
tiles among them, right after a decode attention of the layer's shape whose output is the GEMV's input.

H100, Llama-2-7B sym_int4, batch 1 (docs/gpu-log.md, session 21): the output projection with a (16, 512, 8)
whole-row tile took a graph step from 2.0898 to 2.0436 ms, and tuned this way it picks that tile itself (2.0943 ->
2.0465 ms against tuning back to back); whole-row tiles forced on the qkv projection too, which follows a ~1 us
norm kernel, made the step slower (2.19-2.21 ms); timed right after a norm kernel (session 22), the qkv and gate/up
projections picked the tiles they pick back to back, so only the output projection is marked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# keys the timing attention reads: the first span a decode graph records (graph_storage's span)
TIMING_KEYS = 256


@dataclass(frozen=True)
class AfterAttention:
    """The GEMV's input is the output of decode attention over `heads` query heads of `head_dim` (GQA: kv_heads)."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def tag(self) -> str:
        """What the tuning key records for this context."""
        return f"after-attention {self.heads}/{self.kv_heads}x{self.head_dim}"

    def input_maker(self, rows: int, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
        """A call that runs decode attention of this shape (random operands, TIMING_KEYS keys) for `rows` tokens
        and returns its output as the GEMV's [rows, heads * head_dim] input."""
        from .triton_decode_attention import decode_attention

        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn((rows, self.heads, 1, self.head_dim), generator=gen, device=device, dtype=dtype)
        planes = (rows, self.kv_heads, TIMING_KEYS, self.head_dim)
        k = torch.randn(planes, generator=gen, device=device, dtype=dtype)
        v = torch.randn(planes, generator=gen, device=device, dtype=dtype)
        key_ok = torch.ones((rows, TIMING_KEYS), device=device, dtype=torch.bool)
        scale = self.head_dim ** -0.5
        return lambda: decode_attention(q, k, v, key_ok, scale).view(rows, self.heads * self.head_dim)


def mark_after_attention(linear: torch.nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Record on a packed linear (its PackedCache) that decode attention of this shape produces its input; layers
    that are not packed, or whose input width differs, are left unmarked."""
    cache = getattr(linear, "_packed_cache", None)
    if cache is not None and getattr(linear, "in_features", None) == heads * head_dim:
        cache.decode_context = AfterAttention(heads, kv_heads, head_dim)
