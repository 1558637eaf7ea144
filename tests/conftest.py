"""Shared fixtures: deterministic seeds and small helpers for tolerance checks."""
from __future__ import annotations

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
