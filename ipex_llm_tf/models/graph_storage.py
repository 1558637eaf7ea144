"""The KV storage behind graph decoding: buffers owned by a model's GraphDecoder that outlive generate() calls.

`GraphKVCache` is the transformers Cache generate() sees; its layers write into `KVBuffers`, whose planes keep their
addresses (graphs recorded over them stay valid) until a longer context or a larger batch than any before regrows
them. A call with fewer rows works in the first rows of the planes (a view with the same addresses), so calls that
alternate batch sizes keep every graph. `_SpanView` is what decoder layers see as their cache inside a static step:
write the token at a device-side slot, read the first `span` slots.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import Cache

from .. import kernels
from ..devices import collector_paused, free_random_generator
from ..env import env_flag
from .kv_cache import BlockKVLayer, Fp8BlockKVLayer

SPAN_BLOCK = 256

XPU_GRAPHS_ENV = "IPEX_LLM_TF_XPU_GRAPHS"


def graph_api(device: torch.device) -> Any:
    """The torch module that records graphs on `device`: torch.cuda; torch.xpu when its XPUGraph exists and
    IPEX_LLM_TF_XPU_GRAPHS=1 (opt-in: the same capture, not yet run on Intel hardware by this project); else None."""
    if device.type == "cuda":
        return torch.cuda
    if (device.type == "xpu" and hasattr(getattr(torch, "xpu", None), "XPUGraph")
            and env_flag(XPU_GRAPHS_ENV, False)):
        return torch.xpu
    return None


class CaptureFailed(RuntimeError):
    """A graph capture the device refused; its cause is what the captured work did that a capture forbids."""


_CAPTURE_STREAMS: dict[torch.device, Any] = {}  # every capture on a device on one stream, warmed once


def record_graph(device: torch.device, pool: Any, run: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """(graph, output) of `run` captured into memory pool `pool` on the device's capture stream and replayed once,
    or CaptureFailed with the stream that was current before current again and the device's random generator out
    of capture mode (its seed and offset kept).

    The first capture on a device runs `run` once eagerly on that stream beforehand, so that a library setting up
    per-stream state on first use does it outside the capture (PyTorch's make_graphed_callables warms its capture
    stream for that reason: hipBLASLt created its handle mid-capture). Garbage collection waits while it captures
    (devices.collector_paused)."""
    api = graph_api(device)
    graph = api.CUDAGraph() if api is torch.cuda else api.XPUGraph()
    current = api.current_stream()
    try:
        stream = _CAPTURE_STREAMS.get(device)
        if stream is None:
            stream = api.Stream(device=device)
            stream.wait_stream(current)
            with api.stream(stream):
                run()
            current.wait_stream(stream)
            _CAPTURE_STREAMS[device] = stream
        with collector_paused(), api.graph(graph, pool=pool, stream=stream):
            out = run()
    except Exception as err:
        api.set_stream(current)  # torch's graph context leaves its capture stream current when ending a capture raises
        note = ""
        try:
            free_random_generator(api, device)
        except Exception as rng_err:  # (a torch without graphsafe_set_state): the capture's error is the one to raise
            note = f" (and the random generator stays in capture mode: {type(rng_err).__name__}: {rng_err})"
        raise CaptureFailed(f"{type(err).__name__}: {err}{note}") from err
    graph.replay()
    api.synchronize()
    return graph, out


def graphs_supported(device: torch.device) -> bool:
    """Whether decode steps on `device` are captured as graphs (see graph_api); elsewhere they run eagerly."""
    return graph_api(device) is not None


class GraphKVLayer(BlockKVLayer):
    """A BlockKVLayer whose planes come from the decoder's buffers, so they keep their addresses across calls."""

    def __init__(self, buffers: "KVBuffers", layer_idx: int, **kwargs: Any) -> None:
        super().__init__(block_size=SPAN_BLOCK)
        self.buffers, self.layer_idx = buffers, layer_idx

    def _reserve(self, tokens: int) -> None:
        if tokens <= self.capacity():
            return
        planes = self.buffers.planes(self.layer_idx, self._planes, tokens)
        for name, plane in planes.items():
            plane[:, :, :self.length] = self._planes[name][:, :, :self.length]
        self._planes = planes

    def adopt_storage(self, tokens: int, batch: int) -> None:
        """Take the decoder's stored planes (their first `batch` rows) as this layer's, holding the `tokens` tokens a
        prompt graph wrote there."""
        planes = self.buffers.rows(self.layer_idx, batch)
        self._planes = planes
        self.device, self.dtype = planes["keys"].device, planes["keys"].dtype
        self.length, self.is_initialized = tokens, True

    def _map_planes(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        for name, plane in self._planes.items():
            mapped = fn(plane)
            if mapped.shape != plane.shape:
                # a batch-size change (e.g. beams expanded on the cache): the planes leave the shared buffers
                self._planes[name], self.buffers.detached = mapped, True
            else:
                plane.copy_(mapped)  # beam reordering: in place, so recorded graphs stay valid


class Fp8GraphKVLayer(GraphKVLayer, Fp8BlockKVLayer):
    """A GraphKVLayer storing Fp8BlockKVLayer's float8 codes and per-vector scales (quantize_kv_cache=True)."""


class GraphKVCache(Cache):
    """The KV cache generate() gets on a graph-decoding model; its storage belongs to the model's GraphDecoder."""

    def __init__(self, buffers: "KVBuffers", num_layers: int, fp8: bool = False) -> None:
        layer_class = Fp8GraphKVLayer if fp8 else GraphKVLayer
        super().__init__(layers=[layer_class(buffers, idx) for idx in range(num_layers)])
        self.buffers = buffers
        self.early_steps = False   # set by generate() for greedy calls: steps may be replayed early (graph_decode)
        self.early_misses = 0      # early steps of this call whose inputs did not match

    def advance(self) -> None:
        """Count the token a graph replay wrote into every layer."""
        for layer in self.layers:
            layer.length += 1


class KVBuffers:
    """Per-layer key/value storage [rows, kv_heads, capacity, ...], grown (and graphs dropped) only as needed: rows
    is the largest batch seen, and a smaller batch works in the first rows."""

    def __init__(self) -> None:
        self.storage: dict[int, dict[str, torch.Tensor]] = {}
        self.version = 0      # bumped whenever storage moves: graphs recorded over the old storage are invalid
        self.detached = False

    def planes(self, layer_idx: int, like: dict[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
        """Storage for one layer with room for `tokens`: a plane shaped and typed like each (empty) plane of `like`
        (the first rows of the stored ones)."""
        held = self.storage.get(layer_idx)
        batch = next(iter(like.values())).shape[0]
        same = held is not None and held.keys() == like.keys() and all(_same_kind(held[n], p) for n, p in like.items())
        if not (same and held["keys"].shape[0] >= batch and held["keys"].shape[2] >= tokens):
            rows, capacity = batch, max(tokens, SPAN_BLOCK)
            if same:  # a larger batch keeps the context reached, a longer context the rows: alternating calls settle
                rows, capacity = max(rows, held["keys"].shape[0]), max(capacity, held["keys"].shape[2])
            capacity = 1 << (capacity - 1).bit_length()  # powers of two: a long generation regrows log2 times
            # zeros, not empty: masked slots still enter the products, and garbage NaNs would leak through them
            with persistent():
                held = {name: plane.new_zeros(rows, plane.shape[1], capacity, *plane.shape[3:])
                        for name, plane in like.items()}
            self.storage[layer_idx] = held
            self.version += 1
        return self.rows(layer_idx, batch)

    def release(self) -> int:
        """Drop every layer's storage (graphs recorded over it become stale); the bytes it held."""
        held = sum(plane.numel() * plane.element_size()
                   for planes in self.storage.values() for plane in planes.values())
        self.storage.clear()
        self.version += 1
        return held

    def rows(self, layer_idx: int, batch: int) -> dict[str, torch.Tensor]:
        """The first `batch` rows of one layer's stored planes (views: the same addresses)."""
        return {name: plane[:batch] for name, plane in self.storage[layer_idx].items()}


def persistent() -> torch.inference_mode:
    """Where tensors that outlive a generate() call are made: outside inference mode, so that a later call made
    without it (generate() itself only disables grad) may still write into them."""
    return torch.inference_mode(False)


def _same_kind(plane: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether a stored plane holds what `like` does (heads, head size, dtype, device), whatever its rows and slots."""
    return (plane.shape[1] == like.shape[1] and plane.shape[3:] == like.shape[3:] and plane.dtype == like.dtype
            and plane.device == like.device)


class _SpanView:
    """What decoder layers see as their cache inside a graph step: write the token at `slot`, read `span` slots."""

    def __init__(self, buffers: KVBuffers, batch: int, slot: torch.Tensor, span: int) -> None:
        self.buffers, self.batch, self.slot, self.span = buffers, batch, slot, span

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The span's keys and values (float8 codes for an fp8 cache: see kv_scales), this token's written in."""
        keys, values = self._span_planes(layer_idx)
        kernels.write_kv_slot(key, value, keys, values, self.slot, self.kv_scales(layer_idx))
        return keys, values

    def rotate_and_update(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_idx: int, heads: int,
                          kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For one token's merged q/k/v [B, 1, H + 2 H_kv, D]: (its query after RoPE, the span's keys, its values),
        the rotated key and the value written in (kernels.rotary_and_write_kv: one kernel on Triton)."""
        keys, values = self._span_planes(layer_idx)
        query = kernels.rotary_and_write_kv(qkv, cos, sin, heads, kv_heads, keys, values, self.slot,
                                            self.kv_scales(layer_idx))
        return query, keys, values

    def rotate_and_attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_idx: int, heads: int,
                          kv_heads: int, mask: torch.Tensor | None, scale: float) -> torch.Tensor | None:
        """rotate_and_update, then one-query attention over the span masked by `mask` (the step's 4-D boolean
        mask): [B, H, 1, D] from one Triton kernel (kernels.rotary_decode_attention); None where that kernel does
        not apply (another backend, a float8 cache, no boolean mask), for the caller to take the two-step path."""
        if mask is None or self.kv_scales(layer_idx) is not None or not kernels.rotary_attention_applies(qkv, mask):
            return None
        keys, values = self._span_planes(layer_idx)
        return kernels.rotary_decode_attention(qkv, cos, sin, heads, kv_heads, keys, values, self.slot,
                                               mask[:, 0, 0, :self.span], scale)

    def _span_planes(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value planes, cut to the step's rows and the span it reads."""
        planes = self.buffers.rows(layer_idx, self.batch)
        return planes["keys"][:, :, :self.span], planes["values"][:, :, :self.span]

    def kv_scales(self, layer_idx: int) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """The span's per-vector key and value scales of an fp8 cache, else None."""
        planes = self.buffers.rows(layer_idx, self.batch)
        if "keys_scale" not in planes:
            return None
        return planes["keys_scale"][:, :, :self.span], planes["values_scale"][:, :, :self.span]
