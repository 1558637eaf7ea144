"""Shared fixtures: deterministic seeds and small helpers for tolerance checks."""
from __future__ import annotations

import contextlib
import gc
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


class _FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name

    def wait_stream(self, other: "_FakeStream") -> None:
        pass


class _FakeGenerator:
    """A random generator with the CUDA generator's state API; `capturing` stands for a state a capture holds."""

    def __init__(self, device: str = "cpu", seed: int = 0, offset: int = 0, capturing: bool = False) -> None:
        self.device, self.seed, self.offset, self.capturing = device, seed, offset, capturing

    def manual_seed(self, seed: int) -> None:
        self.seed, self.offset = seed, 0

    def initial_seed(self) -> int:
        return self.seed

    def set_offset(self, offset: int) -> None:
        self.offset = offset

    def get_offset(self) -> int:
        return self.offset

    def graphsafe_set_state(self, other: "_FakeGenerator") -> None:
        self.seed, self.offset, self.capturing = other.seed, other.offset, other.capturing


class FakeGraphs:
    """A graph API on the CPU that records which stream each capture ran on. With `refuse`, captures fail as CUDA's
    do when the captured work did something a capture forbids: the work runs, then ending the capture raises,
    leaving the capture's stream current (as torch's graph context does)."""

    def __init__(self, refuse: bool) -> None:
        self.refuse, self.default = refuse, _FakeStream("default")
        self.current, self.captures, self.streams_made, self.replays = self.default, 0, 0, 0
        self.collecting: list[bool] = []  # whether Python's garbage collector was on in each capture
        self.default_generators = [_FakeGenerator(seed=1234, offset=8)]

    def current_device(self) -> int:
        return 0

    def graph_pool_handle(self) -> object:
        return object()

    def XPUGraph(self) -> "FakeGraphs":  # noqa: N802 (torch's name); the graph's replay() is counted here
        return self

    def replay(self) -> None:
        self.replays += 1

    def synchronize(self) -> None:
        pass

    def Stream(self, device: object = None) -> _FakeStream:  # noqa: N802 (torch's name)
        self.streams_made += 1
        return _FakeStream("capture")

    def current_stream(self) -> _FakeStream:
        return self.current

    def set_stream(self, stream: _FakeStream) -> None:
        self.current = stream

    @contextlib.contextmanager
    def stream(self, stream: _FakeStream):
        before, self.current = self.current, stream
        yield
        self.current = before

    @contextlib.contextmanager
    def graph(self, graph: object, pool: object = None, stream: "_FakeStream | None" = None):
        self.captures += 1
        self.collecting.append(gc.isenabled())
        self.default_generators[0].capturing = True
        before, self.current = self.current, stream
        yield
        if self.refuse:  # (the generator stays in capture mode, as CUDA's does)
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.default_generators[0].capturing = False
        self.current = before


def fake_graphs(monkeypatch: pytest.MonkeyPatch, refuse: bool) -> FakeGraphs:
    """FakeGraphs in place of every device's graph API (whether a device has graphs is left to the caller)."""
    fake = FakeGraphs(refuse)
    monkeypatch.setattr("ipex_llm_tf.models.graph_decode.graph_api", lambda device: fake)
    monkeypatch.setattr("ipex_llm_tf.models.graph_storage.graph_api", lambda device: fake)
    monkeypatch.setattr("ipex_llm_tf.models.graph_storage._CAPTURE_STREAMS", {})
    return fake


@pytest.fixture
def refusing_graphs(monkeypatch: pytest.MonkeyPatch) -> FakeGraphs:
    """Every graph capture on any device fails (FakeGraphs with refuse)."""
    return fake_graphs(monkeypatch, refuse=True)


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
