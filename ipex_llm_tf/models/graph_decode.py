"""Decode steps replayed from captured CUDA graphs over a KV cache whose storage outlives generate() calls.

Eager decoding of a 7B model spends ~30 ms per token launching ~700 small kernels from Python while the GPU needs a
few ms for them. Here generate() keeps its own loop (sampling, beams, stopping criteria, streamers all unchanged), but
each one-token step of a patched model is one graph replay:

- `GraphKVCache` is a transformers Cache whose layers write into buffers owned by the model's `GraphDecoder`; the
  buffers (and so the graphs recorded over them) are reused by every later generate() call: they hold the largest
  batch seen, and a smaller batch works in their first rows.
- a step attends over the first `span` cache slots (the length rounded up to SPAN_BLOCK), masked by a static
  key-validity row that holds the padding mask and causality; a graph is recorded once per (batch, span) after one
  eager warm-up run of the same step (which also settles the Triton kernels' tuning), so the first steps of each span
  cost a capture: `GraphDecoder.stats` reports how many and how long.
- a plain prompt replays a graph recorded for its padded length (models/prompt_graphs.py); whatever else is not a
  plain one-token step runs the eager fused forward on the same cache.
- greedy calls replay each step early, on a side stream, while generate() does its per-token host work
  (models/early_steps.py); a step whose real inputs differ from the early ones replays again.
- a cpu_embedding=True table looks tokens up on the host, which no graph records: its steps take the looked-up
  vectors as a static input filled before each replay, and neither replay early (their next token's vector comes
  from the host) nor replay prompts.
"""
from __future__ import annotations

import functools
import logging
import time
import types
from typing import Any, Callable

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import kernels
from . import eager_step
from .compiled_step import CompiledStep, compiles_steps
from .early_steps import EarlyStep, early_step_wanted, greedy_call, replay_early
from .graph_storage import (SPAN_BLOCK, XPU_GRAPHS_ENV, CaptureFailed, GraphKVCache, KVBuffers,  # noqa: F401
                            _SpanView, graph_api, graphs_supported, persistent, record_graph)
from .kv_cache import Fp8BlockKVCache
from .norm_fold import folded_plan, parts_buffer, run_blocks_folded
from .patching import embed_and_first_norm, embedding_on_cpu, run_blocks
from .prompt_graphs import PromptGraphs
from .step_records import DecodeStats, StepGraph, time_replays
from .step_rope import StepRope

# transformers renamed `past_key_values` to `cache` in its 5.2x releases; speak whichever this version speaks
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_LOG = logging.getLogger("ipex_llm_tf")


class GraphDecoder:
    """Runs one-token decode steps of a fused model as CUDA graph replays (eagerly elsewhere)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.buffers = KVBuffers()
        self.fp8 = bool(getattr(model, FP8_KV_FLAG, False))  # quantize_kv_cache=True: float8 storage
        self.steps: dict[tuple[int, int], StepGraph] = {}
        self.pool = None
        self.stats = DecodeStats()
        self.compiled = CompiledStep(self._run, self.stats)  # CPU steps, when compiles_steps() says so
        self.side: Any = None          # the stream early steps replay on, made on first use
        self.early: EarlyStep | None = None
        self.prompts = PromptGraphs(self)
        self.fold_parts: torch.Tensor | None = None  # one-row steps' norm sums (models/norm_fold.py)
        self.fold_warm = False  # whether a folded step has run outside a capture (its kernels are compiled)
        self.capture_error: str | None = None  # why a capture failed; once set, steps and prompts run eagerly
        base = model.base_model
        self.rope = StepRope(base.rotary_emb)
        self.windows = sorted({layer.self_attn.sliding_window for layer in base.layers
                               if layer.self_attn.sliding_window is not None})

    def new_cache(self) -> GraphKVCache:
        """A cache for one generate() call, backed by this decoder's persistent storage."""
        self.buffers.detached = False
        return GraphKVCache(self.buffers, self.model.config.num_hidden_layers, self.fp8)

    def serves(self, device: torch.device) -> bool:
        """Whether generate() on `device` should bring this decoder's cache (graphs capture there, and an fp8
        cache needs the Triton kernels that write and read float8 inside the graph)."""
        if not graphs_supported(device):
            return compiles_steps(device, self.fp8)
        if not self.fp8:
            return True
        if kernels.op_backend("kv_write", device) != "triton":
            return False
        from ..kernels.triton_linear import fp8_native  # imports Triton: only asked on CUDA
        return fp8_native(device)

    def can_replay(self, input_ids: torch.Tensor | None, cache: Any, kwargs: dict) -> bool:
        """Whether this forward call is a plain one-token step over a GraphKVCache that a graph can serve."""
        if not isinstance(cache, GraphKVCache) or cache.buffers is not self.buffers or self.buffers.detached:
            return False
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1 or cache.get_seq_length() == 0:
            return False
        return not any(kwargs.get(name) not in (None, False) for name in eager_step.UNSUPPORTED_KWARGS)

    def step(self, input_ids: torch.Tensor, cache: GraphKVCache, attention_mask: torch.Tensor | None,
             position_ids: torch.Tensor | None) -> torch.Tensor:
        """Logits [batch, 1, vocab] of one token, its keys and values written into the cache."""
        length = cache.get_seq_length()
        early, self.early = self.early, None
        if early is not None:
            if early.confirmed(cache, length, self.buffers.version, input_ids, attention_mask, position_ids):
                early.done.wait()  # the current stream takes the early logits once the replay wrote them
                self.stats.replays += 1
                self.stats.early_hits += 1
                return self._finish(early.step, cache, length, early.step.key_ok.shape[1], on_side=True)
            cache.early_misses += 1
            graph_api(input_ids.device).current_stream().wait_stream(self.side)
        for layer in cache.layers:  # room for this token; regrowing storage bumps buffers.version
            layer._reserve(length + 1)
        batch, span = input_ids.shape[0], -(-(length + 1) // SPAN_BLOCK) * SPAN_BLOCK
        step = self.steps.get((batch, span))
        if step is None or step.version != self.buffers.version:
            self.drop_stale()
            step = self._static_inputs(input_ids, span)
            self.steps[(batch, span)] = step
        self._fill(step, input_ids, length, attention_mask, position_ids)
        device = input_ids.device
        if step.logits is None:  # the first step of a (batch, span) runs eagerly: it warms kernels and caches
            step.logits = self._run(step, span)
            if self.graphs_on(device):
                self._capture(step, span)
        elif self.graphs_on(device):
            step.graph.replay()
            self.stats.replays += 1
            return self._finish(step, cache, length, span, on_side=False)
        elif compiles_steps(device, self.fp8):
            step.logits = self.compiled((batch, span), step, span)
        else:
            step.logits = self._run(step, span)
        cache.advance()
        return step.logits.clone()

    def replay_ms(self, batch: int = 1, replays: int = 100, rounds: int = 5) -> float | None:
        """Device ms of one recorded decode step at `batch` (its shortest span), median of `rounds` timings of
        `replays` back-to-back replays: the step's GPU work without generate()'s host time. None if none recorded.

        Replays rewrite the step's own cache slot, which the next generate() call overwrites anyway.
        """
        recorded = [(span, step) for (rows, span), step in self.steps.items()
                    if rows == batch and step.graph is not None and step.version == self.buffers.version]
        if not recorded:
            return None
        self.settle()
        return time_replays(min(recorded, key=lambda item: item[0])[1], replays, rounds)

    def drop_stale(self) -> None:
        """Free the graphs (steps and prompts) recorded over storage that has since moved, and their inputs: they can
        never replay again."""
        self.steps = {key: kept for key, kept in self.steps.items() if kept.version == self.buffers.version}
        self.prompts.drop_stale(self.buffers.version)
        if not self.steps and not self.prompts.graphs:
            # the dropped graphs held the only references to their memory pool; capturing into a pool whose last
            # graph is gone trips the allocator, so the next capture starts a new pool
            self.pool = None

    def graphs_on(self, device: torch.device) -> bool:
        """Whether steps and prompts on `device` are captured and replayed: it has graphs and no capture failed."""
        return self.capture_error is None and graphs_supported(device)

    def record(self, run: Callable[[], torch.Tensor], device: torch.device) -> tuple[Any, torch.Tensor]:
        """(graph, output) of `run` recorded in this decoder's memory pool and replayed once; an eager run of the
        same work must come just before (it warms the kernels: nothing may tune or sync inside a capture). A failed
        capture raises CaptureFailed and turns capturing off: later steps and prompts run eagerly."""
        if self.pool is None:
            self.pool = graph_api(device).graph_pool_handle()
        try:
            return record_graph(device, self.pool, run)
        except CaptureFailed as err:
            self.capture_error = str(err)
            _LOG.warning("a CUDA/XPU graph capture failed (%s); this model decodes eagerly from now on "
                         "(IPEX_LLM_TF_GRAPH_DECODE=0 turns graph decoding off)", err)
            raise

    def settle(self) -> None:
        """Make the current stream wait for an early step still running, and drop it: call before anything else
        reads or writes the KV storage."""
        if self.early is not None:
            graph_api(self.early.step.ids.device).current_stream().wait_stream(self.side)
            self.early = None

    def _finish(self, step: StepGraph, cache: GraphKVCache, length: int, span: int, on_side: bool) -> torch.Tensor:
        """A replayed step's logits (copied out) after counting its token; the next step replayed early if it can
        (on_side: this step was itself replayed early, on the side stream)."""
        cache.advance()
        if step.hidden is not None or not early_step_wanted(cache, length + 1, span):
            return step.logits.clone()
        api = graph_api(step.ids.device)
        if self.side is None:
            self.side = api.Stream(device=step.ids.device)
        self.early, logits = replay_early(api, self.side, step, cache, length + 1, after_current=not on_side)
        self.stats.early_steps += 1
        return logits

    # -- internals -----------------------------------------------------------------------------------------------------
    def _static_inputs(self, input_ids: torch.Tensor, span: int) -> StepGraph:
        batch, device = input_ids.shape[0], input_ids.device
        with persistent():
            if batch == 1 and (self.fold_parts is None or self.fold_parts.device != device):
                self.fold_parts = parts_buffer(len(self.model.base_model.layers), self.model.config.hidden_size,
                                               device)
            return StepGraph(None, torch.zeros(batch, 1, dtype=torch.long, device=device),
                             torch.zeros(batch, 1, dtype=torch.long, device=device),
                             torch.zeros(1, dtype=torch.long, device=device),
                             torch.zeros(batch, span, dtype=torch.bool, device=device), version=self.buffers.version)

    def _fill(self, step: StepGraph, input_ids: torch.Tensor, length: int, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor | None) -> None:
        step.ids.copy_(input_ids)
        base = self.model.base_model
        if embedding_on_cpu(base):  # the host's lookup, into a static input made from the first one
            vectors = base.embed_tokens(input_ids)
            if step.hidden is None:
                with persistent():
                    step.hidden = torch.empty_like(vectors)
            step.hidden.copy_(vectors)
        step.slot.fill_(length)
        if position_ids is not None:
            step.positions.copy_(position_ids[:, -1:])
        else:
            step.positions.fill_(length)
        step.key_ok.zero_()
        if attention_mask is not None and attention_mask.dim() == 2:
            step.key_ok[:, :length + 1].copy_(attention_mask[:, -(length + 1):].bool())
        else:
            step.key_ok[:, :length + 1] = True

    def _run(self, step: StepGraph, span: int) -> torch.Tensor:
        """The step itself, as plain tensor ops on the static inputs (what a capture records)."""
        model, base = self.model, self.model.base_model
        if step.hidden is not None:
            hidden, first_normed = step.hidden, None
        else:
            hidden, first_normed = embed_and_first_norm(base, step.ids)
        cos_sin = self.rope(hidden, step.positions)
        masks = {None: step.key_ok[:, None, None, :]}
        if self.windows:
            key_pos = torch.arange(span, device=hidden.device)
            for window in self.windows:
                masks[window] = masks[None] & (key_pos > step.slot - window)[None, None, None, :]
        view = _SpanView(self.buffers, step.ids.shape[0], step.slot, span)
        plan = folded_plan(base, hidden, self.fold_parts)
        if plan is not None:  # the adds and norms in the GEMVs' epilogues (models/norm_fold.py)
            self.fold_warm = True
            return model.lm_head(run_blocks_folded(base, plan, hidden, first_normed, cos_sin, view, masks,
                                                   self.fold_parts))
        return model.lm_head(run_blocks(base, hidden, cos_sin, view, masks, first_normed))

    def _capture(self, step: StepGraph, span: int) -> None:
        start = time.perf_counter()
        if step.ids.shape[0] == 1 and not self.fold_warm:  # the eager step ran unfolded (plans not yet settled):
            self._run(step, span)                            # again, to compile the folded kernels outside a capture
            self.fold_warm = True
        # the eager run just done warmed every kernel; recording re-runs the step, rewriting the same slot
        try:
            step.graph, step.logits = self.record(lambda: self._run(step, span), step.ids.device)
        except CaptureFailed:  # the eager run's logits stand
            return
        self.stats.captures += 1
        self.stats.capture_seconds += time.perf_counter() - start
        self.stats.spans.append(span)


def _graph_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """forward() that serves one-token steps from graph replays (CUDA) or eager_step (CPU), and all else as before."""
    decoder: "GraphDecoder | None" = getattr(model, "_ipex_llm_tf_graph_decoder", None)
    cache = kwargs.get(CACHE_KWARG)
    if not args and decoder is not None and decoder.can_replay(kwargs.get("input_ids"), cache, kwargs):
        logits = decoder.step(kwargs["input_ids"], cache, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        return CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})
    if decoder is not None:
        decoder.settle()
        kind = decoder.prompts.kind_of(kwargs.get("input_ids"), cache, kwargs) if not args else None
        if kind is not None:
            logits = decoder.prompts.run(kwargs["input_ids"], cache, kind, kwargs.get("attention_mask"))
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})
    if not args and eager_step.can_step(model, kwargs.get("input_ids"), cache, kwargs):
        logits = eager_step.step(model, kwargs["input_ids"], cache, kwargs.get("position_ids"))
        return CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})
    return type(model).forward(model, *args, **kwargs)


def _graph_generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """generate() that brings a GraphKVCache on CUDA unless the caller passed a cache or turned caching off."""
    caller_cache = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
    decoder = graph_decoder(model)
    if not caller_cache and kwargs.get("use_cache", True):
        if decoder is not None and decoder.serves(model.device):
            kwargs[CACHE_KWARG] = decoder.new_cache()
            kwargs[CACHE_KWARG].early_steps = greedy_call(model, kwargs)
        elif getattr(model, FP8_KV_FLAG, False):
            kwargs[CACHE_KWARG] = Fp8BlockKVCache()
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        if decoder is not None:
            decoder.settle()


_WRAPPERS: dict[type, dict[str, Any]] = {}


def _wrappers_for(cls: type) -> dict[str, Any]:
    """forward / generate wrappers for one model class, carrying the class methods' signatures.

    generate() inspects forward's signature to decide what to pass (position_ids, logits_to_keep): a bare
    (*args, **kwargs) would make it drop them, which costs a full-vocabulary head over the whole prompt.
    """
    if cls not in _WRAPPERS:
        _WRAPPERS[cls] = {name: _signed(function, getattr(cls, name))
                          for name, function in (("forward", _graph_forward), ("generate", _graph_generate))}
    return _WRAPPERS[cls]


def _signed(function: Any, like: Any) -> Any:
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return function(model, *args, **kwargs)
    return functools.wraps(like)(wrapper)


def install_graph_decode(model: nn.Module) -> GraphDecoder:
    """Give a fused-forward model a GraphDecoder: generate() then decodes through graph replays on CUDA."""
    decoder = GraphDecoder(model)
    model._ipex_llm_tf_graph_decoder = decoder
    for name, wrapper in _wrappers_for(type(model)).items():
        setattr(model, name, types.MethodType(wrapper, model))
    return decoder


_WANTED_FLAG = "_ipex_llm_tf_graph_decode"


FP8_KV_FLAG = "_ipex_llm_tf_fp8_kv"


def want_graph_decode(model: nn.Module, fp8_kv: bool = False) -> None:
    """Mark a fused-forward model for graph decoding, installed whenever it sits on a device that can capture;
    fp8_kv: its generate() keeps keys and values in float8 (in the graph storage where it can, else eagerly)."""
    setattr(model, _WANTED_FLAG, True)
    setattr(model, FP8_KV_FLAG, fp8_kv)
    sync_graph_decode(model)


def sync_graph_decode(model: nn.Module) -> None:
    """Install or remove the GraphDecoder to match the model's device (call after every move).

    Off CUDA (and off compiled CPU steps, see compiled_step) only the forward() wrapper stays, for eager_step's
    one-token steps; generate() is the class's own.
    """
    if not getattr(model, _WANTED_FLAG, False):
        return
    device = next(model.parameters()).device
    on_capturing_device = graphs_supported(device) or compiles_steps(device, getattr(model, FP8_KV_FLAG, False))
    if on_capturing_device and graph_decoder(model) is None:
        install_graph_decode(model)
    elif not on_capturing_device:
        uninstall_graph_decode(model, keep_wanted=True)
        install_step_forward(model)
        if getattr(model, FP8_KV_FLAG, False):  # generate() still brings the (eager) fp8 cache
            model.generate = types.MethodType(_wrappers_for(type(model))["generate"], model)


def install_step_forward(model: nn.Module) -> None:
    """Only the forward() wrapper: CPU one-token steps through eager_step, everything else as the class does it."""
    model.forward = types.MethodType(_wrappers_for(type(model))["forward"], model)


def graph_decoder(model: nn.Module) -> "GraphDecoder | None":
    """The GraphDecoder installed on this model, if any."""
    return getattr(model, "_ipex_llm_tf_graph_decoder", None)


def release_kv_storage(model: nn.Module) -> int:
    """Free the KV storage that graph decoding keeps between generate() calls (sized for the largest batch and the
    longest context seen) and the graphs recorded over it; the next call allocates and records again. Returns the
    bytes freed (0 for a model that keeps none)."""
    decoder = graph_decoder(model)
    if decoder is None:
        return 0
    decoder.settle()
    freed = decoder.buffers.release()
    decoder.drop_stale()
    return freed


def uninstall_graph_decode(model: nn.Module, keep_wanted: bool = False) -> None:
    """Take the GraphDecoder off a model, for good unless keep_wanted (steps spanning devices or ranks can't be
    captured); frees its storage."""
    if not keep_wanted:
        model.__dict__.pop(_WANTED_FLAG, None)
    for name, wrapper in _wrappers_for(type(model)).items():
        bound = model.__dict__.get(name)
        if getattr(bound, "__func__", None) is wrapper:
            del model.__dict__[name]
    model.__dict__.pop("_ipex_llm_tf_graph_decoder", None)
