"""One-token decode steps that call the fused modules directly, past transformers' per-layer wrappers.

On the CPU a SmolLM2 step is bound by per-call overhead, not arithmetic: transformers' model and decoder-layer
forwards (position and mask bookkeeping, kwarg-deprecation and output-capture wrappers, nn.Module.__call__) cost
~1 ms of a ~16 ms token. For a plain step (one new token per row, no padding, a KV cache, no extra outputs) the
pre-norm residual blocks below issue the same ops in the same order as LlamaDecoderLayer and its Mistral / Qwen2 /
Qwen3 twins, so the logits are equal bit for bit (tests/test_eager_step.py checks each architecture).
Anything else, and any model carrying forward hooks, goes through transformers' forward unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as nn_module
from transformers.cache_utils import DynamicLayer

from .graph_storage import GraphKVCache

# forward() arguments that ask for more than a step or a prompt computes: such calls take transformers' forward
UNSUPPORTED_KWARGS = ("inputs_embeds", "labels", "output_attentions", "output_hidden_states")


def has_hooks(model: nn.Module) -> bool:
    """Whether forward hooks sit on the model or the modules a fused step calls (they would be skipped)."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    base = model.base_model
    modules = [base, base.norm] + [m for layer in base.layers for m in (layer, layer.input_layernorm, layer.self_attn,
                                                                         layer.post_attention_layernorm, layer.mlp)]
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _returns_valid_keys_only(cache: Any) -> bool:
    # With no mask the step attends to every key the cache returns: dynamic layers (and our block layers) return the
    # filled ones; static layers return their whole preallocated length, which only transformers' mask makes right
    layers = getattr(cache, "layers", None)
    return (bool(layers) and not isinstance(cache, GraphKVCache)  # graph layers return a padded span too
            and all(isinstance(layer, DynamicLayer) for layer in layers))


def can_step(model: nn.Module, input_ids: "torch.Tensor | None", cache: Any, kwargs: dict) -> bool:
    """Whether this forward call is a plain CPU one-token step that step() computes exactly as transformers does."""
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1 or not input_ids.is_cpu:
        return False
    if cache is None or not _returns_valid_keys_only(cache) or kwargs.get("use_cache") is False:
        return False
    if kwargs.get("return_dict") is False or any(kwargs.get(name) not in (None, False) for name in UNSUPPORTED_KWARGS):
        return False
    mask = kwargs.get("attention_mask")
    if mask is not None and not (mask.dim() == 2 and bool(mask.all())):
        return False  # padding: transformers builds the 4-D mask
    return cache.get_seq_length() > 0 and not has_hooks(model)


def step(model: nn.Module, input_ids: torch.Tensor, cache: Any, position_ids: "torch.Tensor | None") -> torch.Tensor:
    """Logits [batch, 1, vocab] of one token per row; its keys and values go into `cache`."""
    base = model.base_model
    hidden = base.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long)
    cos_sin = base.rotary_emb(hidden, position_ids)
    for layer in base.layers:
        attended = layer.self_attn.forward(layer.input_layernorm.forward(hidden), position_embeddings=cos_sin,
                                           attention_mask=None, cache=cache)[0]
        hidden = hidden + attended
        hidden = hidden + layer.mlp.forward(layer.post_attention_layernorm.forward(hidden))
    return model.lm_head(base.norm.forward(hidden))
