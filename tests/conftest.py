"""Shared fixtures: deterministic seeds and small helpers for tolerance checks."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every matmul and op on the exact float32 reference, for tests that compare logic rather than kernels."""
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")


class RefusingGraphs:
    """A graph API whose captures fail as CUDA's do when the captured work did something a capture forbids: the work
    runs, then ending the capture raises, leaving the capture's stream current (as torch's graph context does)."""

    def __init__(self) -> None:
        self.stream, self.captures = "default", 0

    def graph_pool_handle(self) -> object:
        return object()

    def XPUGraph(self) -> object:  # noqa: N802 (torch's name)
        return object()

    def current_stream(self) -> str:
        return self.stream

    def set_stream(self, stream: str) -> None:
        self.stream = stream

    @contextlib.contextmanager
    def graph(self, graph: object, pool: object = None):
        self.captures += 1
        self.stream = "capture"
        yield
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


@pytest.fixture
def refusing_graphs(monkeypatch: pytest.MonkeyPatch) -> RefusingGraphs:
    """Every graph capture on any device fails (RefusingGraphs); whether a device has graphs is left to the test."""
    refusing = RefusingGraphs()
    monkeypatch.setattr("ipex_llm_tf.models.graph_decode.graph_api", lambda device: refusing)
    monkeypatch.setattr("ipex_llm_tf.models.graph_storage.graph_api", lambda device: refusing)
    return refusing


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def sqnr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `actual` against `expected`, in dB."""
    expected = expected.double()
    noise = (actual.double() - expected).pow(2).sum().clamp_min(1e-300)
    return float(10 * torch.log10(expected.pow(2).sum() / noise))


TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device() -> str | None:
    """Where Triton kernel tests run: a CUDA or XPU device, the CPU under TRITON_INTERPRET=1, else None (skip)."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu" if TRITON_INTERPRET else None
