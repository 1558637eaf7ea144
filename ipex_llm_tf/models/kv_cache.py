"""Optional KV caches for generate(): storage preallocated in blocks of tokens, and a float8 variant of it.

Both are ordinary transformers Cache objects (pass one as `generate(..., cache=BlockKVCache())` or to a forward),
so they work with the fused forwards and with transformers' own ones alike.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .. import kernels
from ..kernels.reference import dequantize_kv_vectors, quantize_kv_vectors

DEFAULT_BLOCK_SIZE = 256


def _plane_view(name: str) -> property:
    """A layer attribute that reads as a view of the stored plane `name` up to the current length (None before any
    update), made when read: nothing holds a second full-size copy between steps, and a graph step's token costs no
    view per layer (GraphKVCache.advance). It takes only None, which transformers' layer base class assigns."""
    def read(layer: "BlockKVLayer") -> torch.Tensor | None:
        planes = getattr(layer, "_planes", None)
        return planes[name][:, :, :layer.length] if planes else None

    def write(layer: "BlockKVLayer", value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError(f"a BlockKVLayer's {name} are a view of its stored planes: write them through "
                                 f"update()")
    return property(read, write)


class BlockKVLayer(DynamicLayer):
    """One layer's keys and values in buffers grown `block_size` tokens at a time.

    transformers' DynamicLayer concatenates, copying the whole cache at every decode step; here a step writes its
    token in place and a copy happens once per block. Stored tensors ("planes") are [batch, kv_heads, capacity, ...];
    `keys` / `values` are views of the stored key / value planes up to the current length.
    """

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, **kwargs: Any) -> None:
        super().__init__()
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.length = 0
        self._planes: dict[str, torch.Tensor] = {}

    keys = _plane_view("keys")      # float8 codes for Fp8BlockKVLayer
    values = _plane_view("values")

    # -- storage format: subclasses change these -----------------------------------------------------------------------
    def _encode(self, kind: str, states: torch.Tensor) -> dict[str, torch.Tensor]:
        """The planes that store `states` ("keys" or "values"), [batch, heads, tokens, ...] each."""
        return {kind: states}

    def _decode(self, kind: str, length: int) -> torch.Tensor:
        """The first `length` stored keys or values, in the dtype attention computes in."""
        return self._planes[kind][:, :, :length]

    def _states(self, kind: str, past: int, new: torch.Tensor) -> torch.Tensor:
        """What update() returns: the stored past followed by the states just added."""
        return self._decode(kind, self.length)

    # -- transformers' layer interface ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Create empty planes shaped after the first states (no capacity yet)."""
        self.device, self.dtype = key_states.device, key_states.dtype
        planes = {**self._encode("keys", key_states[:, :, :0]), **self._encode("values", value_states[:, :, :0])}
        self._planes = {name: plane.new_empty(*plane.shape[:2], 0, *plane.shape[3:]) for name, plane in planes.items()}
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states; return all keys and values so far."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = {**self._encode("keys", key_states), **self._encode("values", value_states)}
        past, count = self.length, key_states.shape[-2]
        self._reserve(past + count)
        for name, tensor in new.items():
            self._planes[name][:, :, past:past + count] = tensor
        self.length += count
        return self._states("keys", past, key_states), self._states("values", past, value_states)

    def rotate_and_append(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                          kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """update() for the merged projection qkv [B, S, H + 2 H_kv, D] of S tokens whose RoPE is still to do: (their
        query heads rotated [B, H, S, D], every key and value so far), their keys rotated and written with their
        values by one kernel on Triton (kernels.rotary_and_append_kv). Float planes only (not Fp8BlockKVLayer)."""
        key_states = qkv[:, :, heads:heads + kv_heads].transpose(1, 2)
        if not self.is_initialized:
            self.lazy_initialization(key_states, key_states)
        past, count = self.length, qkv.shape[1]
        self._reserve(past + count)
        query = kernels.rotary_and_append_kv(qkv, cos, sin, heads, kv_heads, self._planes["keys"],
                                             self._planes["values"], past)
        self.length += count
        return query, self._states("keys", past, key_states), self._states("values", past, key_states)

    def get_seq_length(self) -> int:
        """Tokens stored."""
        return self.length if self.is_initialized else 0

    def capacity(self) -> int:
        """Tokens that fit before the next reallocation."""
        return self._planes["keys"].shape[2] if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove tokens (negative counts only, as DynamicLayer)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        """Drop all storage."""
        self._planes, self.length = {}, 0  # keys / values read None from here on (_plane_view)
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search."""
        self._map_planes(lambda plane: plane.index_select(0, beam_idx.to(plane.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row `repeats` times."""
        self._map_planes(lambda plane: plane.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only these batch rows."""
        self._map_planes(lambda plane: plane[indices])

    def offload(self) -> None:
        """Move the storage to the CPU."""
        self._map_planes(lambda plane: plane.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        """Bring offloaded storage back to the layer's device."""
        self._map_planes(lambda plane: plane.to(self.device, non_blocking=True))

    # -- helpers -------------------------------------------------------------------------------------------------------
    def _reserve(self, tokens: int) -> None:
        if tokens <= self.capacity():
            return
        capacity = math.ceil(tokens / self.block_size) * self.block_size
        for name, plane in self._planes.items():
            grown = plane.new_empty(*plane.shape[:2], capacity, *plane.shape[3:])
            grown[:, :, :self.length] = plane[:, :, :self.length]
            self._planes[name] = grown

    def _map_planes(self, fn: Any) -> None:
        if self.is_initialized:
            self._planes = {name: fn(plane) for name, plane in self._planes.items()}


class Fp8BlockKVLayer(BlockKVLayer):
    """BlockKVLayer storing float8 e4m3 codes with one float32 scale per token and head.

    Memory per element is 1 byte + 4 / head_dim (half of bf16); each step dequantizes the stored past for attention,
    as SDPA has no float8 inputs. Per-token scales keep every token's precision whatever the magnitudes that come later.
    """

    fp8_dtype = torch.float8_e4m3fn

    def _encode(self, kind: str, states: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, scale = quantize_kv_vectors(states, self.fp8_dtype)
        return {kind: codes, f"{kind}_scale": scale}

    def _decode(self, kind: str, length: int) -> torch.Tensor:
        codes = self._planes[kind][:, :, :length]
        return dequantize_kv_vectors(codes, self._planes[f"{kind}_scale"][:, :, :length], self.dtype)

    def _states(self, kind: str, past: int, new: torch.Tensor) -> torch.Tensor:
        # The step's own tokens are used unrounded, as they are at hand: a prompt attends to itself exactly (and with
        # no past, as is: a prefill's copy of its keys and values would only add to the peak)
        return torch.cat([self._decode(kind, past), new], dim=-2) if past else new


def rotate_and_append(cache: Any, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_idx: int,
                      heads: int, kv_heads: int) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None":
    """BlockKVLayer.rotate_and_append on the cache's layer `layer_idx`; None where that layer is of another kind
    (transformers' own, float8, not made yet), the cache offloads or torch.compile traces, for the caller to rotate
    and call update()."""
    layers = getattr(cache, "layers", None)
    if not layers or layer_idx >= len(layers) or getattr(cache, "offloading", False) or torch.compiler.is_compiling():
        return None  # (a Triton launch is no op Dynamo can trace)
    layer = layers[layer_idx]
    if not isinstance(layer, BlockKVLayer) or type(layer)._encode is not BlockKVLayer._encode:
        return None
    return layer.rotate_and_append(qkv, cos, sin, heads, kv_heads)


class BlockKVCache(Cache):
    """A transformers Cache whose layers preallocate `block_size` tokens at a time (layers are created lazily)."""

    layer_class: type[BlockKVLayer] = BlockKVLayer

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(layer_class_to_replicate=partial(self.layer_class, block_size=block_size))


class Fp8BlockKVCache(BlockKVCache):
    """BlockKVCache storing keys and values as float8 e4m3 with per-token, per-head scales."""

    layer_class = Fp8BlockKVLayer
