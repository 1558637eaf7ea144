"""The kernels as PyTorch custom ops (`torch.ops.ipex_llm_tf.*`), so torch.compile takes each one whole.

Eager calls go straight to the Python dispatch in kernels/__init__.py (a custom op adds dispatcher overhead per call);
modules switch to these ops while torch.compile traces them (`torch.compiler.is_compiling()`), where an opaque op
with a fake (shape-only) implementation keeps Dynamo out of the Triton launch code and the CPU packing caches. Each
op is registered for every device: its implementation is the same dispatch eager code uses.
"""
from __future__ import annotations

import weakref

import torch

from ..formats import get_format
from . import PackedCache, low_bit_linear, rms_norm, rotary, silu_and_mul

# Derived layouts (e.g. the CPU int4 planes) per weight, keyed by the identity of the weight's first packed tensor;
# an entry leaves with its tensor (weakref.finalize) and is checked against it, so a new weight reusing the freed
# memory or id can never be served another weight's layout. (A WeakKeyDictionary would compare tensors with ==.)
_CACHES: dict[int, tuple[weakref.ref, PackedCache]] = {}


def _cache_for(tensor: torch.Tensor) -> PackedCache:
    entry = _CACHES.get(id(tensor))
    if entry is not None and entry[0]() is tensor:
        return entry[1]
    cache = PackedCache()
    _CACHES[id(tensor)] = (weakref.ref(tensor), cache)
    weakref.finalize(tensor, _CACHES.pop, id(tensor), None)
    return cache


@torch.library.custom_op("ipex_llm_tf::low_bit_linear", mutates_args=())
def low_bit_linear_op(x: torch.Tensor, parts: list[torch.Tensor], part_names: str, low_bit: str, out_features: int,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + b for W stored as `low_bit` parts (names comma-separated, in the order of `parts`)."""
    cache = _cache_for(parts[0])
    named = dict(zip(part_names.split(","), parts))
    return low_bit_linear(x, get_format(low_bit), named, bias, out_features, cache)


@low_bit_linear_op.register_fake
def _(x: torch.Tensor, parts: list[torch.Tensor], part_names: str, low_bit: str, out_features: int,
      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("ipex_llm_tf::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kernels.rms_norm as an op."""
    return rms_norm(x, weight, eps)


@rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("ipex_llm_tf::rotary", mutates_args=())
def rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """kernels.rotary as an op (a contiguous [batch, heads, seq, head_dim] result)."""
    return rotary(x, cos, sin).contiguous()


@rotary_op.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("ipex_llm_tf::silu_and_mul", mutates_args=())
def silu_and_mul_op(gate_up: torch.Tensor) -> torch.Tensor:
    """kernels.silu_and_mul as an op."""
    return silu_and_mul(gate_up)


@silu_and_mul_op.register_fake
def _(gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
