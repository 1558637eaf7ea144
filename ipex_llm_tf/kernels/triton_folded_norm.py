"""GEMVs that take a decode step's residual adds and RMSNorms into their epilogues (triton_gemv RES_OUT and
SCALE_OUT), for models/norm_fold.py: a norm costs no kernel of its own.

    h, hw = gemv_residual_out(x, ..., residual, norm_weight, parts)   # h = residual + x @ W.T; hw = fp16(h * w);
                                                                      # parts[p] = program p's sum of h's squares
    y = gemv_scale_out(hw, ..., parts, count, eps)                   # = RMSNorm(h) @ W.T (SiLU-gated if asked)

RMSNorm(h) @ W.T = r * (fp16(h * w) @ W.T) with r = rsqrt(sum(h^2) / K + eps): r is one number a row, so it comes
out of the K loop and is applied to the outputs. The roundings differ from norm-then-GEMV (h * w is rounded before
the scale, not after), so results agree within the GEMV's own error, not bit for bit; the parts are added in a fixed
order by every consuming program, so a step gives the same bits every run. The reference is kernels.rms_norm
followed by the plain GEMV (tests/gpu/test_norm_fold.py).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton

from ..formats import LowBitFormat, Parts
from .grids import cdiv
from .triton_linear import (PLANE_KINDS, UNFUSED, BlockOperands, GemvConfig, _gemv_words, _operands, gated_plan_key,
                            gemv_blocks, plan_key)


def folded_tile(fmt: LowBitFormat, parts: Parts, cache: object, dtype: torch.dtype,
                gated: bool) -> "tuple[BlockOperands, GemvConfig] | None":
    """(operands, tile) for a folded-norm GEMV of one row: the tile of the layer's settled one-row plan (gated: its
    SiLU-epilogue plan); None where that is not a one-plane block-format GEMV or nothing is settled yet. Looks up
    only, launching nothing, so it may run inside a graph capture."""
    ops = _operands(fmt, parts, cache)
    if not isinstance(ops, BlockOperands) or ops.kind in PLANE_KINDS:
        return None
    if gated:
        cfg = ops.plans.get(gated_plan_key(1, dtype))
        return None if cfg is None or cfg == UNFUSED else (ops, cfg)
    plan = ops.plans.get(plan_key(1, dtype))
    return None if plan is None or plan[0] is not gemv_blocks else (ops, plan[1])


def _one_row(cfg: GemvConfig) -> GemvConfig:
    return replace(cfg, block_m=1, split_k=1)


def partial_count(n: int, cfg: GemvConfig) -> int:
    """How many partial sums of squares gemv_residual_out stores for n outputs with tile cfg (one a program)."""
    return cdiv(n, cfg.block_n)


def gemv_residual_out(x: torch.Tensor, ops: BlockOperands, bias: torch.Tensor | None, n: int, cfg: GemvConfig,
                      residual: torch.Tensor, norm_weight: torch.Tensor,
                      parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = residual + x @ W.T + bias, fp16(h * norm_weight)) for one row x [1, K]; the float32 parts
    [>= partial_count(n, cfg)] get h's sum of squares, one part a program."""
    if x.shape[0] != 1 or parts.dtype != torch.float32 or parts.numel() < partial_count(n, cfg):
        raise ValueError(f"gemv_residual_out takes one row and float32 parts of {partial_count(n, cfg)}+ entries, "
                         f"got x {tuple(x.shape)} and parts {parts.dtype} {tuple(parts.shape)}")
    h = torch.empty((1, n), device=x.device, dtype=x.dtype)
    hw = torch.empty_like(h)
    _gemv_words(x, ops, bias, h, n, _one_row(cfg), 1, False, ss_ptr=parts, res_ptr=residual, nw_ptr=norm_weight,
                hw_ptr=hw, RES_OUT=True)
    return h, hw


def gemv_scale_out(hw: torch.Tensor, ops: BlockOperands, bias: torch.Tensor | None, n: int, cfg: GemvConfig,
                   parts: torch.Tensor, count: int, eps: float, gated: bool = False) -> torch.Tensor:
    """RMSNorm(h) @ W.T + bias [1, n] (gated: SiLU(gate) * up, [1, n / 2]) from hw = fp16(h * norm weight) [1, K]
    and the `count` float32 parts of h's sum of squares that gemv_residual_out stored."""
    if hw.shape[0] != 1 or count < 1 or parts.numel() < count:
        raise ValueError(f"gemv_scale_out takes one row and at least `count` ({count}) parts, got hw "
                         f"{tuple(hw.shape)} and parts {tuple(parts.shape)}")
    outputs = n // 2 if gated else n
    y = torch.empty((1, outputs), device=hw.device, dtype=hw.dtype)
    _gemv_words(hw, ops, bias, y, outputs, _one_row(cfg), 1, gated, ss_ptr=parts, ss_count=count,
                norm_k=float(hw.shape[-1]), eps=eps, SCALE_OUT=True, SS_BLOCK=triton.next_power_of_2(count))
    return y
