"""CPU decode steps as one torch.compile'd function: graph_decode's static-span step, compiled instead of captured.

A CPU decode step of a small model is bound by the ~900 small ops and the Python around them (SmolLM2-135M: ~7 of
~15 ms), not by its matmuls. graph_decode already writes the step as one function of static inputs over persistent
KV storage (for CUDA graphs); on the CPU, torch.compile turns that function into one Inductor graph: the elementwise
work fused into a few C++ kernels, the packed int4 matmuls and SDPA as aten calls, no Python in between. Kernels
enter the trace as their plain torch forms (kernels.opaque_under_compile).

Compiling costs seconds (~20-30 s cold on 2 cores, ~8-9 s with Inductor's on-disk cache warm), paid by the first
steps of a new batch size or cache span, so it is opt-in: IPEX_LLM_TF_COMPILE_CPU_DECODE=1. `GraphDecoder.stats`
counts each compile as a capture, with its seconds.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..env import env_flag

COMPILE_ENV = "IPEX_LLM_TF_COMPILE_CPU_DECODE"


def compiled_cpu_decode_requested() -> bool:
    """Whether IPEX_LLM_TF_COMPILE_CPU_DECODE (default 0) asks for compiled CPU decode steps."""
    return env_flag(COMPILE_ENV, False)


def compiles_steps(device: torch.device, fp8: bool) -> bool:
    """Whether decode steps on `device` run compiled: the CPU, when requested, with a float KV cache (the fp8 cache
    stays with its eager layers)."""
    return device.type == "cpu" and not fp8 and compiled_cpu_decode_requested()


class CompiledStep:
    """torch.compile of a step function, built on first use; records each (re)compile's seconds in `stats`."""

    def __init__(self, run: Callable[..., torch.Tensor], stats: Any) -> None:
        self.run, self.stats = run, stats
        self.compiled: "Callable[..., torch.Tensor] | None" = None
        self.seen: set = set()

    def __call__(self, key: tuple, *args: Any) -> torch.Tensor:
        """run(*args) through the compiled function; `key` names the static shapes (a new one may compile)."""
        if self.compiled is None:
            # dynamic=None: shapes start static and a dimension seen changing (span, storage size) turns dynamic,
            # so a long generation compiles about twice, not once per 256-token span
            self.compiled = torch.compile(self.run, dynamic=None)
        if key in self.seen:
            return self.compiled(*args)
        start = time.perf_counter()
        out = self.compiled(*args)
        self.seen.add(key)
        self.stats.captures += 1
        self.stats.capture_seconds += time.perf_counter() - start
        return out
