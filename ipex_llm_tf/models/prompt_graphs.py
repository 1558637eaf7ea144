"""Prompts replayed from captured CUDA graphs, one graph per padded prompt length ("bucket").

An eager 7B prefill launches ~400-730 kernels with Python around each of them: on the lent H100 hosts that host work
(~55 ms) outlasts the kernels themselves (~7 ms for a 32-token prompt, ~30 ms for 1024 tokens), so the first token's
time depended on the host's speed. A plain first forward of a generate() call (an empty GraphKVCache, the last
token's logits only) instead replays a graph recorded for its bucket:

- the prompt is padded at its end to the bucket's length. Attention is causal, so no real token sees the padding; the
  padding's keys and values land in cache slots past the prompt, which the cache does not count and decode steps
  overwrite.
- a left-padded batch (generate()'s padding) replays a graph of its own kind, which takes the padding as a static
  key-validity row and the positions generate() derives from it, and attends through a boolean mask (torch's
  memory-efficient SDPA kernel instead of flash): causality and the padding, and a padding query attends to itself
  alone, so that no row is fully masked (its keys and values stay finite in slots the decode steps mask out).
- a bucket is recorded the second time a call falls in it, after one eager run at the bucket's length (which also
  settles the kernels' tuning): a one-off prompt length costs no capture. `GraphDecoder.stats` counts both. A bucket
  whose graphs keep being dropped (storage regrown for a longer context or a larger batch than any before) stops
  recording after MAX_RECORDS.
- buckets are multiples of 1/8 of the prompt's next power of two (at least 32 tokens), so the padding is under 32
  tokens or under a quarter of the prompt, and prompts up to MAX_PROMPT_TOKENS fall in 16 buckets.
- the graphs share the decode steps' memory pool, which keeps the largest prompt's temporaries (~0.2 GB for a
  1024-token 7B prompt: its dequantized weight bands and MLP activations). Longer prompts run eagerly: their kernels
  take about as long as their host work (~60 ms at 2048 tokens on an H100), and their temporaries would stay held.

Anything else (a cache already holding tokens, right or inner padding, custom positions, all logits asked for,
hooks, an fp8 cache, rotary embeddings whose frequencies depend on the length, a cpu_embedding=True table) runs the
eager forward.
IPEX_LLM_TF_PROMPT_GRAPHS=0 turns the graphs off.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..env import env_flag
from ..kernels.grids import next_power_of_2
from .eager_step import UNSUPPORTED_KWARGS, has_hooks
from .graph_storage import CaptureFailed, GraphKVCache, persistent
from .patching import embed_and_first_norm, embedding_on_cpu, run_blocks
from .step_rope import fixed_frequencies

PROMPT_GRAPHS_ENV = "IPEX_LLM_TF_PROMPT_GRAPHS"
MAX_PROMPT_TOKENS = 1024
MIN_BUCKET_STEP = 32
# times one bucket may be recorded: regrown storage drops every graph, and a bucket whose graphs kept being dropped
# would pay an eager run and a capture each call; past this its prompts stay eager
MAX_RECORDS = 3


def prompt_bucket(tokens: int) -> int:
    """The padded length a prompt of `tokens` tokens is replayed at."""
    if tokens < 1:
        raise ValueError(f"a prompt has at least one token, got {tokens}")
    step = max(MIN_BUCKET_STEP, next_power_of_2(tokens) // 8)
    return -(-tokens // step) * step


PLAIN, LEFT_PADDED = "plain", "left-padded"


@dataclass
class _PromptGraph:
    ids: torch.Tensor          # [batch, bucket] the prompt's token ids, then padding
    positions: torch.Tensor    # [batch, bucket] 0, 1, 2, ... (per row after its left padding: LEFT_PADDED)
    last: torch.Tensor         # [1] index of the prompt's last token: its logits are the output
    version: int               # the KV storage's version the graph writes into
    key_ok: torch.Tensor | None = None  # [batch, bucket] True at the prompt's real tokens (LEFT_PADDED only)
    graph: Any = None
    logits: torch.Tensor | None = None


class PromptGraphs:
    """The prompt graphs of one GraphDecoder (which owns the KV storage, the memory pool and the stats)."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.graphs: dict[tuple[int, int, str], _PromptGraph] = {}
        self.seen: dict[tuple[int, int, str], int] = {}
        self.records: dict[tuple[int, int, str], int] = {}

    def kind_of(self, input_ids: torch.Tensor | None, cache: Any, kwargs: dict) -> str | None:
        """PLAIN or LEFT_PADDED where this forward call is the first forward of a generate() call that a prompt
        graph can serve, else None."""
        decoder = self.decoder
        if not env_flag(PROMPT_GRAPHS_ENV, True) or decoder.fp8:
            return None
        if not isinstance(cache, GraphKVCache) or cache.buffers is not decoder.buffers or decoder.buffers.detached:
            return None
        if input_ids is None or input_ids.dim() != 2 or not 1 < input_ids.shape[1] <= MAX_PROMPT_TOKENS:
            return None
        # (compiled CPU steps use the same cache); after a failed capture, none is tried again
        if not decoder.graphs_on(input_ids.device):
            return None
        if cache.get_seq_length() != 0 or kwargs.get("logits_to_keep") != 1 or kwargs.get("return_dict") is False:
            return None
        if any(kwargs.get(name) not in (None, False) for name in UNSUPPORTED_KWARGS):
            return None
        model = decoder.model
        if model.training or fixed_frequencies(model.base_model.rotary_emb) is None or has_hooks(model):
            return None
        if embedding_on_cpu(model.base_model):  # host lookups: a graph cannot record them
            return None
        return _prompt_kind(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))

    def run(self, input_ids: torch.Tensor, cache: GraphKVCache, kind: str,
            attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Logits [batch, 1, vocab] of the prompt's last token from its bucket's graph of `kind` (kind_of), the
        prompt's keys and values written into the cache; None when the bucket has no graph yet (the caller runs the
        eager forward)."""
        batch, tokens = input_ids.shape
        key = (batch, prompt_bucket(tokens), kind)
        decoder = self.decoder
        prompt = self.graphs.get(key)
        if prompt is None or prompt.version != decoder.buffers.version:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < 2 or self.records.get(key, 0) >= MAX_RECORDS:
                return None
            self.records[key] = self.records.get(key, 0) + 1
            try:
                prompt = self._record(input_ids, key, attention_mask)
            except CaptureFailed:  # capturing is off from now on (GraphDecoder.record)
                return None
        self._fill(prompt, input_ids, attention_mask)
        prompt.graph.replay()
        decoder.stats.prompt_replays += 1
        for layer in cache.layers:
            layer.adopt_storage(tokens, batch)
        return prompt.logits.clone()

    def drop_stale(self, version: int) -> None:
        """Forget graphs recorded over storage that has since moved (they can never replay again)."""
        self.graphs = {key: kept for key, kept in self.graphs.items() if kept.version == version}

    # -- internals -----------------------------------------------------------------------------------------------------
    def _record(self, input_ids: torch.Tensor, key: tuple[int, int, str],
                attention_mask: torch.Tensor | None) -> _PromptGraph:
        start = time.perf_counter()
        decoder = self.decoder
        batch, bucket, kind = key
        device = input_ids.device
        with persistent():
            positions = torch.arange(bucket, device=device).expand(batch, bucket)
            prompt = _PromptGraph(torch.zeros(batch, bucket, dtype=torch.long, device=device), positions,
                                  torch.zeros(1, dtype=torch.long, device=device), -1)
            if kind == LEFT_PADDED:
                prompt.positions = positions.clone()
                prompt.key_ok = torch.zeros(batch, bucket, dtype=torch.bool, device=device)
        self._fill(prompt, input_ids, attention_mask)
        # the eager run settles the kernels' tuning and one-time checks at the bucket's shapes, and grows the storage
        # to the bucket if it must (which makes graphs recorded over the old storage useless: they go first)
        self._forward(prompt)
        decoder.drop_stale()
        prompt.version = decoder.buffers.version
        prompt.graph, prompt.logits = decoder.record(lambda: self._forward(prompt), device)
        self.graphs[key] = prompt
        decoder.stats.prompt_captures += 1
        decoder.stats.prompt_capture_seconds += time.perf_counter() - start
        return prompt

    def _forward(self, prompt: _PromptGraph) -> torch.Tensor:
        """The padded prompt through the model as plain tensor ops on the static inputs (what a capture records)."""
        model, decoder = self.decoder.model, self.decoder
        base = model.base_model
        hidden, first_normed = embed_and_first_norm(base, prompt.ids)
        cos_sin = base.rotary_emb(hidden, prompt.positions)
        # a cache of its own over the decoder's storage: it writes the bucket's keys and values from slot 0
        scratch = GraphKVCache(decoder.buffers, len(base.layers))
        normed = run_blocks(base, hidden, cos_sin, scratch, self._masks(prompt), first_normed)
        return model.lm_head(normed.index_select(1, prompt.last))

    def _masks(self, prompt: _PromptGraph) -> "dict[int | None, torch.Tensor] | None":
        """A LEFT_PADDED graph's boolean masks [batch, 1, bucket, bucket] by sliding window (None: no window):
        causal over real keys, and every query attends to itself; None for PLAIN (causal SDPA, no mask)."""
        if prompt.key_ok is None:
            return None
        at = torch.arange(prompt.ids.shape[1], device=prompt.ids.device)
        back = at[:, None] - at[None, :]  # query - key
        allowed = ((back >= 0) & prompt.key_ok[:, None, None, :]) | (back == 0)
        masks = {None: allowed}
        for window in self.decoder.windows:
            masks[window] = allowed & (back < window)
        return masks

    @staticmethod
    def _fill(prompt: _PromptGraph, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        tokens = input_ids.shape[1]
        prompt.ids[:, :tokens].copy_(input_ids)
        prompt.ids[:, tokens:].fill_(0)
        prompt.last.fill_(tokens - 1)
        if prompt.key_ok is not None:
            real = attention_mask.bool()
            prompt.key_ok[:, :tokens].copy_(real)
            prompt.key_ok[:, tokens:].fill_(False)
            prompt.positions[:, :tokens].copy_(_positions_after_padding(real))
            prompt.positions[:, tokens:].fill_(0)


def _positions_after_padding(real: torch.Tensor) -> torch.Tensor:
    """generate()'s positions for a left-padded batch (real [batch, tokens], True at real tokens): counted from each
    row's first real token, 1 at the padding."""
    return (real.long().cumsum(-1) - 1).masked_fill(~real, 1)


def _prompt_kind(input_ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None) -> str | None:
    """PLAIN for a prompt without padding at positions 0, 1, 2, ...; LEFT_PADDED for rows padded on the left only
    (each row's real tokens last, at least one), their tokens at the positions generate() gives them; else None.
    One device sync: generate() syncs at this point anyway."""
    tokens = input_ids.shape[1]
    if mask is not None and (mask.dim() != 2 or mask.shape != input_ids.shape):
        return None
    if positions is not None and (positions.dim() != 2 or positions.shape[1] != tokens):
        return None
    device = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    counted = torch.arange(tokens, device=device).expand_as(input_ids)
    padded_positions = _positions_after_padding(real)
    left_only = (real[:, 1:] >= real[:, :-1]).all() & real[:, -1].all()
    no_padding = real.all()
    flags = [no_padding, left_only,
             torch.ones((), dtype=torch.bool, device=device) if positions is None else (positions == counted).all(),
             torch.ones((), dtype=torch.bool, device=device) if positions is None
             else ((positions == padded_positions) | ~real).all()]  # (the padding's own: 1 or 0 by version)
    no_padding, left_only, counted_ok, padded_ok = torch.stack(flags).tolist()
    if no_padding and counted_ok:
        return PLAIN
    if left_only and padded_ok and not no_padding:
        return LEFT_PADDED
    return None
