"""What a GraphDecoder keeps per decode step and about its warm-up (models/graph_decode.py), and a step's timing."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from .graph_storage import graph_api


@dataclass
class StepGraph:
    """A decode step's static inputs (what its graph reads), its graph once recorded, and its logits."""

    graph: Any                # torch.cuda.CUDAGraph or torch.xpu.XPUGraph, once recorded
    ids: torch.Tensor         # [batch, 1] token ids
    positions: torch.Tensor   # [batch, 1] RoPE positions
    slot: torch.Tensor        # [1] cache slot the token is written to
    key_ok: torch.Tensor      # [batch, span] True where a cached key may be attended
    hidden: torch.Tensor | None = None  # [batch, 1, hidden] the tokens' vectors, where the table is on the CPU
    logits: torch.Tensor | None = None
    version: int = -1


@dataclass
class DecodeStats:
    """Warm-up cost of graph decoding: captures recorded and the seconds they took (warm-up run included)."""

    captures: int = 0
    capture_seconds: float = 0.0
    replays: int = 0           # steps whose logits a replay gave (early ones included)
    spans: list = field(default_factory=list)
    early_steps: int = 0       # steps replayed before generate() asked for them
    early_hits: int = 0        # ... whose inputs then matched, so their logits were used
    prompt_captures: int = 0   # prompt graphs recorded (models/prompt_graphs.py), eager run included in the seconds
    prompt_capture_seconds: float = 0.0
    prompt_replays: int = 0


def time_replays(step: StepGraph, replays: int, rounds: int) -> float:
    """Device ms of one replay of a recorded step: the median of `rounds` timings of `replays` back-to-back
    replays, each round after a warm replay outside its timing."""
    graph, api = step.graph, graph_api(step.ids.device)
    times = []
    for _ in range(rounds):
        graph.replay()
        start, stop = api.Event(enable_timing=True), api.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / replays)
    return statistics.median_high(times)
