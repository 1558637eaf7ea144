"""Installing the fused decoder on one model instance: check the module layout, then swap the layers' children."""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .common import (DecoderOptions, FusedAttention, FusedGatedMLP, FusedRMSNorm, UnsupportedModelError,
                     norm_eps)

_ATTN_CHILDREN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_CHILDREN = ("gate_proj", "up_proj", "down_proj", "act_fn")
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def _check_decoder(model: nn.Module, options: DecoderOptions) -> None:
    base = model.base_model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(getattr(base, "norm", None), nn.Module):
        raise UnsupportedModelError(f"{type(model).__name__} has no `layers` ModuleList and final `norm`")
    if any(t.device.type == "meta" for t in model.parameters()) or \
            any(t.device.type == "meta" for t in model.buffers()):
        raise UnsupportedModelError("the model still has meta-device weights; patch it after loading them")
    norm_eps(base.norm)
    for idx, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        children = [(attn, name) for name in _ATTN_CHILDREN + ("head_dim", "scaling", "layer_idx")]
        children += [(mlp, name) for name in _MLP_CHILDREN] + [(layer, name) for name in _LAYER_NORMS]
        if options.qk_norm:
            children += [(attn, "q_norm"), (attn, "k_norm")]
        missing = [name for owner, name in children if getattr(owner, name, None) is None]
        if missing:
            raise UnsupportedModelError(f"decoder layer {idx} lacks {', '.join(missing)}")
        for name in _LAYER_NORMS:
            norm_eps(getattr(layer, name))
        if options.qk_norm:
            norm_eps(attn.q_norm)
            norm_eps(attn.k_norm)


def patch_decoder_model(model: nn.Module, options: DecoderOptions) -> None:
    """Swap every decoder layer's attention, MLP and norms (and the final norm) of this instance for fused ones.

    Raises UnsupportedModelError, before changing anything, when the modules are not laid out as expected.
    """
    _check_decoder(model, options)
    config, base = model.config, model.base_model
    for layer in base.layers:
        attn = layer.self_attn
        layer.self_attn = FusedAttention(attn, options.sliding_window(config, attn.layer_idx), options.qk_norm)
        layer.mlp = FusedGatedMLP(layer.mlp, str(getattr(config, "hidden_act", "")))
        for name in _LAYER_NORMS:
            setattr(layer, name, FusedRMSNorm.from_module(getattr(layer, name)))
        if {name for name, _ in layer.named_children()} == _PRE_NORM_BLOCK:
            layer.forward = types.MethodType(pre_norm_block_forward, layer)
    base.norm = FusedRMSNorm.from_module(base.norm)
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:  # a float head; LowBitLinear already multiplies rows
        head.forward = types.MethodType(linear_on_rows, head)


# the children of a pre-norm residual block (LlamaDecoderLayer and its Mistral / Qwen2 / Qwen3 twins); a layer with
# any other (a post-norm, say) keeps transformers' forward
_PRE_NORM_BLOCK = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def pre_norm_block_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                           **kwargs: Any) -> torch.Tensor:
    """LlamaDecoderLayer.forward with the attention's residual add and the post-attention norm as one op
    (FusedRMSNorm.add_forward: one kernel on Triton, the same two ops as transformers elsewhere)."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)  # the name transformers used before 5.x
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, cache=cache, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
    normed, summed = self.post_attention_layernorm.add_forward(attended, hidden_states)
    return summed + self.mlp(normed)


def run_blocks(base: nn.Module, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], cache: Any,
               masks: "dict[int | None, torch.Tensor] | None",
               first_normed: torch.Tensor | None = None) -> torch.Tensor:
    """The patched decoder stack and its final norm as plain tensor ops, for graph steps and prompts: the pre-norm
    residual blocks with every residual add done by the kernel of the norm that follows it (the same roundings, half
    the kernels); masks maps a layer's sliding window to its attention mask (None: causal, built by the attention);
    first_normed: the first layer's input norm of hidden, where the caller computed it already."""
    layers = base.layers
    residual = hidden
    normed = layers[0].input_layernorm(hidden) if first_normed is None else first_normed
    for i, layer in enumerate(layers):
        attended = layer.self_attn(normed, position_embeddings=cos_sin, cache=cache,
                                   attention_mask=None if masks is None else masks[layer.self_attn.sliding_window])[0]
        normed, residual = layer.post_attention_layernorm.add_forward(attended, residual)
        following = layers[i + 1].input_layernorm if i + 1 < len(layers) else base.norm
        normed, residual = following.add_forward(layer.mlp(normed), residual)
    return normed


def embedding_on_cpu(base: nn.Module) -> bool:
    """Whether the input embedding is a cpu_embedding=True table, whose lookups run on the host (so no graph can
    record them: graphs take its output as an input instead)."""
    from ..devices import CPUEmbedding
    from ..low_bit_linear import CPULowBitEmbedding
    return isinstance(base.embed_tokens, (CPUEmbedding, CPULowBitEmbedding))


def embed_and_first_norm(base: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden, the first layer's input norm of it or None): one kernel (kernels.embed_rms_norm) for a plain
    nn.Embedding before a FusedRMSNorm, else the embedding alone."""
    embed, first = base.embed_tokens, base.layers[0].input_layernorm
    if type(embed) is not nn.Embedding or embed.max_norm is not None or not isinstance(first, FusedRMSNorm):
        return embed(ids), None
    normed, hidden = kernels.embed_rms_norm(ids, embed.weight, first.weight, first.variance_epsilon)
    return hidden, normed


def linear_on_rows(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward with x's leading dims flattened first, so the product is always one matrix multiply.

    transformers hands the head the last position of the prefill, x = hidden[:, -1:, :], whose strides do not fold
    into one matrix; for a weight that does not require grad torch.matmul then takes its batched path, which copies
    the whole weight: ~50 ms a prefill for SmolLM2's 49152-row head on the CPU, against ~4 ms for the same product.
    """
    return F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(*x.shape[:-1], self.out_features)
