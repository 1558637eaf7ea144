"""Fused decoder pieces shared by the Llama-family architectures: norms, merged projections, gated MLP, attention.

The patch keeps transformers' own decoder layers and model forward (masks, RoPE tables, cache creation, output
capture) and swaps only the layers' children for modules with the same call signatures, on the instance given.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import kernels
from ..kernels import ops
from ..kernels.decode_context import mark_after_attention
from ..kernels.reference import dequantize_kv_vectors
from ..low_bit_linear import LowBitLinear
from .kv_cache import rotate_and_append

SlidingWindowRule = Callable[[Any, int], "int | None"]


class UnsupportedModelError(ValueError):
    """The model's modules do not have the layout a fused forward expects; nothing has been changed."""


def no_sliding_window(config: Any, layer_idx: int) -> int | None:
    """Every layer attends to the whole past (Llama)."""
    return None


@dataclass(frozen=True)
class DecoderOptions:
    """What sets one Llama-family architecture apart; biases need no option as merging carries whatever exists."""

    qk_norm: bool = False                           # RMSNorm over each head's q and k before RoPE (Qwen3)
    sliding_window: SlidingWindowRule = no_sliding_window  # window of layer i, or None for full attention


class FusedRMSNorm(nn.Module):
    """RMSNorm with transformers' Llama numerics: statistics in float32, the scale applied in the input dtype."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        # The original Parameter itself, not a copy: loaders, tying and .to() keep seeing one tensor
        self.weight = weight
        self.variance_epsilon = eps

    @classmethod
    def from_module(cls, norm: nn.Module) -> "FusedRMSNorm":
        """Take over a transformers RMSNorm's weight and epsilon."""
        return cls(norm.weight, norm_eps(norm))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dim."""
        if kernels.opaque_under_compile(hidden_states):
            return ops.rms_norm_op(hidden_states, self.weight, self.variance_epsilon)
        return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalise(residual + x), residual + x): a residual add and this norm as one kernel where one exists."""
        return kernels.add_rms_norm(x, residual, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def norm_eps(norm: nn.Module) -> float:
    """A transformers RMSNorm's epsilon; UnsupportedModelError if the module is not one."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
        raise UnsupportedModelError(f"{type(norm).__name__} is not an RMSNorm with `weight` and an epsilon")
    return float(eps)


# -- merged projections --------------------------------------------------------------------------------------------

class ConcatProjections(nn.Module):
    """Fallback for projections that cannot share one weight (mixed precisions or formats): run each, concatenate."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.projections = nn.ModuleList(layers)
        self.in_features = layers[0].in_features
        self.out_features = sum(layer.out_features for layer in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., sum of outs]."""
        return torch.cat([layer(x) for layer in self.projections], dim=-1)


def _merged_bias(layers: Sequence[nn.Module]) -> torch.Tensor | None:
    biases = [layer.bias for layer in layers]
    present = [b for b in biases if b is not None]
    if not present:
        return None
    ref = present[0]
    # A layer without bias contributes zeros, which is what it adds today
    return torch.cat([(b.detach() if b is not None else ref.new_zeros(layer.out_features)).to(ref.dtype)
                      for b, layer in zip(biases, layers)])


def _is_row_wise(layer: LowBitLinear) -> bool:
    specs = layer.fmt.part_specs(layer.out_features, layer.in_features)
    return all(shape[0] == layer.out_features for shape, _ in specs.values())


def _merge_same_kind(layers: Sequence[nn.Module]) -> nn.Module | None:
    first = layers[0]
    if any(getattr(layer, "in_features", None) != first.in_features for layer in layers):
        return None
    out_features = sum(layer.out_features for layer in layers)
    bias = _merged_bias(layers)
    if all(type(layer) is nn.Linear for layer in layers):
        weights = [layer.weight for layer in layers]
        if len({(w.dtype, w.device) for w in weights}) != 1:
            return None
        merged = nn.Linear(first.in_features, out_features, bias=bias is not None, device="meta")
        merged.weight = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=False)
        if bias is not None:
            merged.bias = nn.Parameter(bias, requires_grad=False)
        return merged
    if all(isinstance(layer, LowBitLinear) for layer in layers):
        # Every part of a row-wise format has one row per output feature, so stacking rows is lossless
        if len({layer.fmt.name for layer in layers}) != 1 or not all(_is_row_wise(layer) for layer in layers):
            return None
        merged = LowBitLinear(first.in_features, out_features, first.fmt, bias=bias is not None, device="meta",
                              dtype=None if bias is None else bias.dtype)
        merged.load_parts({name: torch.cat([layer.parts[name] for layer in layers]) for name in first.parts},
                          bias=bias)
        return merged
    return None


def merge_projections(layers: Sequence[nn.Module]) -> nn.Module:
    """One layer whose output is the concatenation of `layers`' outputs: a single matmul where they can be merged."""
    merged = _merge_same_kind(layers)
    return merged if merged is not None else ConcatProjections(layers)


class SeparateProjectionKeys(nn.Module):
    """Base for modules holding one merged projection that save and load under the separate projections' names.

    Checkpoints written from a patched model then keep transformers' layout (q_proj/k_proj/v_proj, gate_proj/up_proj)
    and load into patched and unpatched models alike.
    """

    def _keep_separate_keys(self, merged: str, layers: Sequence[nn.Module], names: Sequence[str]) -> None:
        self._merged_name, self._separate_names = merged, tuple(names)
        self._separate_sizes = tuple(layer.out_features for layer in layers)
        self._separate_biases = tuple(layer.bias is not None for layer in layers)
        self.register_state_dict_post_hook(SeparateProjectionKeys._split_keys)
        self.register_load_state_dict_pre_hook(SeparateProjectionKeys._merge_keys)

    @staticmethod
    def _split_keys(module: "SeparateProjectionKeys", state_dict: dict, prefix: str, local_metadata: Any) -> None:
        head = f"{prefix}{module._merged_name}."
        for key in [k for k in state_dict if k.startswith(head)]:
            rest, tensor = key[len(head):], state_dict.pop(key)
            if rest.startswith("projections."):  # ConcatProjections: projections.<i>.<tensor name>
                index, name = rest.split(".", 2)[1:]
                state_dict[f"{prefix}{module._separate_names[int(index)]}.{name}"] = tensor
                continue
            pieces = tensor.split(module._separate_sizes)
            for layer_name, piece, has_bias in zip(module._separate_names, pieces, module._separate_biases):
                if rest != "bias" or has_bias:
                    # clones: savers such as safetensors reject (or drop as "tied") tensors sharing storage
                    state_dict[f"{prefix}{layer_name}.{rest}"] = piece.clone()

    @staticmethod
    def _merge_keys(module: "SeparateProjectionKeys", state_dict: dict, prefix: str, *args: Any) -> None:
        merged = getattr(module, module._merged_name)
        for rest, own in merged.state_dict(keep_vars=True).items():
            if rest.startswith("projections."):
                index, name = rest.split(".", 2)[1:]
                source = f"{prefix}{module._separate_names[int(index)]}.{name}"
                if source in state_dict:
                    state_dict[f"{prefix}{module._merged_name}.{rest}"] = state_dict.pop(source)
                continue
            sources = [f"{prefix}{name}.{rest}" for name in module._separate_names]
            if not all(src in state_dict or (rest == "bias" and not has_bias)
                       for src, has_bias in zip(sources, module._separate_biases)):
                continue  # leave the keys for load_state_dict to report as missing / unexpected
            pieces = [state_dict.pop(src) if src in state_dict else own.new_zeros(size)
                      for src, size in zip(sources, module._separate_sizes)]
            state_dict[f"{prefix}{module._merged_name}.{rest}"] = torch.cat(pieces)


# -- MLP --------------------------------------------------------------------------------------------------------------

class FusedGatedMLP(SeparateProjectionKeys):
    """down(act(gate(x)) * up(x)) with gate and up as one projection, and SiLU-and-mul as one op."""

    def __init__(self, mlp: nn.Module, hidden_act: str) -> None:
        super().__init__()
        self.gate_up_proj = merge_projections([mlp.gate_proj, mlp.up_proj])
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn
        self.silu = hidden_act in ("silu", "swish")
        self._keep_separate_keys("gate_up_proj", [mlp.gate_proj, mlp.up_proj], ["gate_proj", "up_proj"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., hidden]."""
        if self.silu and isinstance(self.gate_up_proj, LowBitLinear):
            fused = self.gate_up_proj.silu_and_mul_forward(x)  # the activation in the projection's epilogue
            if fused is not None:
                return self.down_proj(fused)
        gate_up = self.gate_up_proj(x)
        if self.silu:
            act = ops.silu_and_mul_op if kernels.opaque_under_compile(gate_up) else kernels.silu_and_mul
            return self.down_proj(act(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


# -- attention --------------------------------------------------------------------------------------------------------

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for x [batch, heads, seq, head_dim] from cos/sin [batch, seq, head_dim]."""
    if kernels.opaque_under_compile(x):
        return ops.rotary_op(x, cos, sin)
    return kernels.rotary(x, cos, sin)


def sliding_causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [q, kv] mask, True where attended: causal (bottom-right aligned) and, with a window, q - k < window."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


# PyTorch 2.11 on an H100 picks cuDNN attention for one-query steps, and cuDNN builds an execution plan for every new
# key length: ~1.8 ms of host time per call, ~60 ms per 7B token, whenever the step is not replayed from a CUDA graph
# (tensor-parallel ranks, IPEX_LLM_TF_GRAPH_DECODE=0). The other kernels need no per-length plan.
# A prompt's attention is eager (never in a graph) and host-bound when short. cuDNN's kernel is the faster one, but it
# costs more host time a call than flash: 7B sym_int4 first token (H100, session 23), cuDNN against flash: 32-token
# prompt 32.5 -> 30.5 ms, 1024 tokens 39.1 -> 40.4, 4096 tokens 111.7 -> 118.9. Up to this many queries, no cuDNN.
SHORT_PROMPT_QUERIES = 512
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device, q_len: int) -> contextlib.AbstractContextManager:
    """The SDPA backends for an attention call: all but cuDNN for one query or a short prompt on CUDA, torch's
    choice otherwise."""
    if q_len > SHORT_PROMPT_QUERIES or device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return sdpa_kernel(_NO_CUDNN)


def native_gqa_ok(mask: torch.Tensor | None, device: torch.device) -> bool:
    """Whether SDPA should read grouped KV heads itself (enable_gqa) rather than get them repeated."""
    # CUDA's flash/efficient kernels take grouped heads only without a mask; with one, enable_gqa drops to the math
    # kernel, which is slower than repeating the KV heads
    return mask is None or device.type != "cuda"


class FusedAttention(SeparateProjectionKeys):
    """Self-attention with one q/k/v matmul and torch's SDPA over grouped KV heads; forward matches LlamaAttention's.

    The KV cache is the transformers Cache object the model passes in, and the mask is the 4-D mask (float or bool)
    the model prepared for eager/sdpa attention, so generate(), beam search and left padding keep working unchanged.
    """

    def __init__(self, attn: nn.Module, sliding_window: int | None, qk_norm: bool) -> None:
        super().__init__()
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.attention_dropout = float(getattr(attn, "attention_dropout", 0.0))
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_key_value_heads = attn.k_proj.out_features // self.head_dim
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.is_causal = True
        self.sliding_window = sliding_window
        self.qkv_proj = merge_projections([attn.q_proj, attn.k_proj, attn.v_proj])
        self._keep_separate_keys("qkv_proj", [attn.q_proj, attn.k_proj, attn.v_proj], ["q_proj", "k_proj", "v_proj"])
        self.o_proj = attn.o_proj
        # decode attention's output is its input: autotuning times its GEMV candidates right after that kernel
        mark_after_attention(self.o_proj, self.num_heads, self.num_key_value_heads, self.head_dim)
        self.q_norm = FusedRMSNorm.from_module(attn.q_norm) if qk_norm else None
        self.k_norm = FusedRMSNorm.from_module(attn.k_norm) if qk_norm else None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        """hidden [batch, seq, hidden] -> (output [batch, seq, hidden], None: SDPA computes no attention weights)."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # the name transformers used before 5.x
        if position_embeddings is None:
            raise ValueError("FusedAttention needs the (cos, sin) position_embeddings the decoder layer passes in")
        batch, q_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, q_len, -1, self.head_dim)
        return self.o_proj(self.attend(qkv, position_embeddings, attention_mask, cache, **kwargs)), None

    def attend(self, qkv: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
               attention_mask: torch.Tensor | None, cache: Any, **kwargs: Any) -> torch.Tensor:
        """The attention output before o_proj, [batch, seq, heads * head_dim], from the merged projection qkv
        [batch, seq, heads + 2 * kv_heads, head_dim]: RoPE, the cache update and attention."""
        batch, q_len = qkv.shape[:2]
        query, key, value = qkv.split([self.num_heads, self.num_key_value_heads, self.num_key_value_heads], dim=2)
        cos, sin = position_embeddings
        if self.q_norm is None and q_len == 1 and hasattr(cache, "rotate_and_update"):
            # a graph step's cache: RoPE, the cache write and attention in one op where it can, else the first two
            if not self.training or self.attention_dropout == 0.0:
                out = cache.rotate_and_attend(qkv, cos, sin, self.layer_idx, self.num_heads, self.num_key_value_heads,
                                              attention_mask, self.scaling)
                if out is not None:
                    return out.reshape(batch, q_len, self.num_heads * self.head_dim)
            query, key, value = cache.rotate_and_update(qkv, cos, sin, self.layer_idx, self.num_heads,
                                                        self.num_key_value_heads)
        elif self.q_norm is None and cache is not None and (appended := rotate_and_append(
                cache, qkv, cos, sin, self.layer_idx, self.num_heads, self.num_key_value_heads)) is not None:
            query, key, value = appended  # a prompt into our block cache: RoPE and the write in one kernel
        else:
            if self.q_norm is not None:
                query, key = self.q_norm(query), self.k_norm(key)
                query = apply_rotary(query.transpose(1, 2), cos, sin)
                key = apply_rotary(key.transpose(1, 2), cos, sin)
            else:
                # q and k heads sit side by side in the merged projection: rotate them as one tensor, half the ops
                query_key = apply_rotary(qkv[:, :, :self.num_heads + self.num_key_value_heads].transpose(1, 2),
                                         cos, sin)
                query, key = query_key.split([self.num_heads, self.num_key_value_heads], dim=1)
            value = value.transpose(1, 2)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        kv_scales = None
        if cache is not None and key.dtype == torch.float8_e4m3fn:  # a graph step's fp8 storage: codes and scales
            kv_scales = cache.kv_scales(self.layer_idx)
        # (_mask_for keeps a one-query mask's kind and shape, so asking with the model's mask answers for its result)
        fused_decode = (not self.training or self.attention_dropout == 0.0) and \
            kernels.decode_attention_applies(query, attention_mask)
        if kv_scales is not None and (attention_mask is None or not fused_decode):
            # only decode_attention reads float8 (a graph step always brings its mask): others get the span dequantized
            key, value = (dequantize_kv_vectors(plane, scales, query.dtype)
                          for plane, scales in zip((key, value), kv_scales))
            kv_scales = None
        mask, is_causal, key, value = self._mask_for(attention_mask, q_len, key, value)
        if fused_decode:
            out = kernels.decode_attention(query, key, value, None if mask is None else mask[:, 0, 0, :], self.scaling,
                                           kv_scales)
            return out.reshape(batch, q_len, self.num_heads * self.head_dim)
        groups = self.num_key_value_groups
        if groups > 1 and q_len == 1 and (mask is None or mask.shape[1] == 1):
            # One query per head: a KV head's group of queries becomes its query sequence, so no KV head is repeated
            # and any SDPA kernel applies, mask or not
            with attention_backends(key.device, q_len):
                out = F.scaled_dot_product_attention(
                    query.reshape(batch, self.num_key_value_heads, groups, self.head_dim), key, value,
                    attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0, scale=self.scaling)
            return out.reshape(batch, q_len, self.num_heads * self.head_dim)
        native_gqa = groups > 1 and native_gqa_ok(mask, key.device)
        if groups > 1 and not native_gqa:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        with attention_backends(key.device, q_len):
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0,
                is_causal=is_causal, scale=self.scaling, enable_gqa=native_gqa)
        return out.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)

    def _mask_for(self, mask: torch.Tensor | None, q_len: int, key: torch.Tensor,
                  value: torch.Tensor) -> tuple[torch.Tensor | None, bool, torch.Tensor, torch.Tensor]:
        kv_len = key.shape[-2]
        if mask is not None:
            if mask.dim() != 4:
                raise ValueError(f"FusedAttention expects the 4-D mask prepared for eager/sdpa attention, got shape "
                                 f"{tuple(mask.shape)}; load the model with attn_implementation='sdpa' or 'eager'")
            # The mask already holds padding, causality and any sliding window, sized for what the cache returns
            return mask[..., :kv_len], False, key, value
        # No mask is what transformers' sdpa path gets when plain causality is enough; follow its conventions
        window = self.sliding_window
        if q_len == 1:
            if window is not None and kv_len > window:
                key, value = key[:, :, -window:], value[:, :, -window:]
            return None, False, key, value
        if kv_len > q_len:
            # Only an empty preallocated (static) cache returns more keys than queries with no mask: its first q_len
            # slots are the prompt, the rest unwritten
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        if window is not None and q_len > window:
            return sliding_causal_mask(q_len, q_len, window, key.device), False, key, value
        return None, True, key, value

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"sliding_window={self.sliding_window}, qk_norm={self.q_norm is not None}")
