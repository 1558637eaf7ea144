"""A graph decode step with its residual adds and RMSNorms folded into the GEMVs around them (kernels/
triton_folded_norm.py), for one-row steps of block-format models on the Triton backend.

Per layer, after the first layer's qkv (which takes the embedding kernel's norm, patching.embed_and_first_norm):

    qkv = SCALE_OUT(hw)  ->  attention (FusedAttention.attend)  ->  h, hw = RES_OUT(o_proj)
        ->  SiLU(gate) * up = SCALE_OUT(hw)  ->  h, hw = RES_OUT(down)

hw = fp16(h * the next norm's weight); each RES_OUT stores its programs' parts of sum(h^2) in a row of its own in
the decoder's float32 `parts` buffer, and the SCALE_OUT after it adds them up. The last layer's down projection
runs plain and the final norm is the usual add + norm kernel, so the head reads what the plain step gives it.
Saves two kernels a layer (64 for a 32-layer model): on the H100 the Llama-2-7B sym_int4 step replays in
1.969 ms instead of 2.001 ms (docs/gpu-log.md, session 26).

IPEX_LLM_TF_FOLD_NORMS=0 turns it off; it also stands aside (the step runs patching.run_blocks) for a batch over
one row, another backend, norms or MLPs other than ours, a projection that is not a one-plane block format, and
until every projection's one-row plan is settled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..env import env_flag
from ..low_bit_linear import LowBitLinear
from .common import FusedAttention, FusedGatedMLP, FusedRMSNorm

FOLD_NORMS_ENV = "IPEX_LLM_TF_FOLD_NORMS"
NARROWEST_TILE = 4  # the fewest outputs a GEMV tile serves (triton_tuning): parts_buffer has room for its count


@dataclass
class FoldedLayer:
    """A layer's projections as (operands, tile) for the folded GEMVs, and the partial-sum counts of its RES_OUTs."""

    qkv: tuple
    o: tuple
    gate_up: tuple
    down: tuple
    o_parts: int
    down_parts: int


def _tile(linear: nn.Module, dtype: torch.dtype, gated: bool = False) -> "tuple | None":
    if not isinstance(linear, LowBitLinear):
        return None
    from ..kernels import triton_folded_norm as FN  # Triton is absent on CPU-only installs
    return FN.folded_tile(linear.fmt, linear.parts, linear._packed_cache, dtype, gated)


def _layer_fits(layer: nn.Module) -> bool:
    return (isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedGatedMLP) and layer.mlp.silu
            and isinstance(layer.input_layernorm, FusedRMSNorm)
            and isinstance(layer.post_attention_layernorm, FusedRMSNorm))


def parts_buffer(layers: int, hidden_size: int, device: torch.device) -> torch.Tensor:
    """The float32 rows the folded step's RES_OUT GEMVs store their partial sums of squares in, two a layer: made
    with a step's static inputs, outside any capture, and kept (graphs record its address)."""
    return torch.empty((2 * layers, -(-hidden_size // NARROWEST_TILE)), device=device, dtype=torch.float32)


def folded_plan(base: nn.Module, hidden: torch.Tensor, parts: torch.Tensor | None) -> "list[FoldedLayer] | None":
    """Per layer, what the folded step launches, if the folded step applies to this step (with `parts` from
    parts_buffer); else None."""
    if parts is None or parts.device != hidden.device or not env_flag(FOLD_NORMS_ENV, True) \
            or hidden.shape[0] != 1 or not isinstance(base.norm, FusedRMSNorm) \
            or kernels.op_backend("rms_norm", hidden.device) != "triton" \
            or kernels.backend_for(hidden.device) != "triton":
        return None
    from ..kernels.triton_folded_norm import partial_count
    plan = []
    for layer in base.layers:
        if not _layer_fits(layer):
            return None
        attn, mlp = layer.self_attn, layer.mlp
        tiles = (_tile(attn.qkv_proj, hidden.dtype), _tile(attn.o_proj, hidden.dtype),
                 _tile(mlp.gate_up_proj, hidden.dtype, gated=True), _tile(mlp.down_proj, hidden.dtype))
        if any(t is None for t in tiles):
            return None
        folded = FoldedLayer(*tiles, o_parts=partial_count(attn.o_proj.out_features, tiles[1][1]),
                             down_parts=partial_count(mlp.down_proj.out_features, tiles[3][1]))
        if max(folded.o_parts, folded.down_parts) > parts.shape[1]:
            return None
        plan.append(folded)
    return plan


def run_blocks_folded(base: nn.Module, plan: list[FoldedLayer], hidden: torch.Tensor, first_normed: torch.Tensor | None,
                      cos_sin: tuple[torch.Tensor, torch.Tensor], cache: Any, masks: dict,
                      parts: torch.Tensor) -> torch.Tensor:
    """patching.run_blocks' result (the final norm of the stack's output, [1, 1, D]) by the folded step."""
    from ..kernels.triton_folded_norm import gemv_residual_out, gemv_scale_out
    layers = base.layers
    d = hidden.shape[-1]
    if first_normed is None:
        first_normed = layers[0].input_layernorm(hidden)
    residual = hidden.reshape(1, d)
    hw = eps = None
    for i, (layer, folded) in enumerate(zip(layers, plan)):
        attn, mlp, post = layer.self_attn, layer.mlp, layer.post_attention_layernorm
        qkv_proj = attn.qkv_proj
        if i == 0:
            qkv = qkv_proj(first_normed.reshape(1, d))
        else:
            qkv = gemv_scale_out(hw, folded.qkv[0], qkv_proj.bias, qkv_proj.out_features, folded.qkv[1],
                                 parts[2 * i - 1], plan[i - 1].down_parts, eps)
        out = attn.attend(qkv.view(1, 1, -1, attn.head_dim), cos_sin, masks[attn.sliding_window], cache)
        residual, hw = gemv_residual_out(out.reshape(1, -1), folded.o[0], attn.o_proj.bias, attn.o_proj.out_features,
                                         folded.o[1], residual, post.weight, parts[2 * i])
        gated = gemv_scale_out(hw, folded.gate_up[0], mlp.gate_up_proj.bias, mlp.gate_up_proj.out_features,
                               folded.gate_up[1], parts[2 * i], folded.o_parts, post.variance_epsilon, gated=True)
        if i + 1 == len(layers):
            normed, _ = base.norm.add_forward(mlp.down_proj(gated), residual)
            return normed.view(1, 1, d)
        following = layers[i + 1].input_layernorm
        residual, hw = gemv_residual_out(gated, folded.down[0], mlp.down_proj.bias, mlp.down_proj.out_features,
                                         folded.down[1], residual, following.weight, parts[2 * i + 1])
        eps = following.variance_epsilon
    raise ValueError("the folded step needs at least one layer")
