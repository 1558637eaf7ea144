"""Kernel dispatch: pick the matmul for a LowBitLinear by device, format and IPEX_LLM_TF_BACKEND.

Backends: "torch" (the reference, any device), "cpu" (PyTorch's packed int4 kernel where the format maps onto it,
else dequantize + matmul), "triton" (CUDA and XPU, when Triton is importable). IPEX_LLM_TF_BACKEND=torch forces the
reference everywhere, for debugging; the default "auto" picks the fastest available path per device.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..formats import LowBitFormat, Parts
from . import cpu_int4
from .reference import linear_reference

BACKENDS = ("auto", "torch", "cpu", "triton")

# At and above this many rows the CPU path dequantizes once to bf16 and uses the BLAS GEMM, which beats the packed
# int4 kernel for prefill-sized inputs (measured in benchmarks/bench_linear.py on the 2-core CI machine).
CPU_GEMM_MIN_ROWS = 64


def requested_backend() -> str:
    """The backend named by IPEX_LLM_TF_BACKEND (default "auto"); ValueError for an unknown name."""
    name = os.environ.get("IPEX_LLM_TF_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"IPEX_LLM_TF_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return name


def triton_available() -> bool:
    """Whether Triton imports (it is what runs our GPU kernels on CUDA and XPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(device: torch.device) -> str:
    """The backend that will run a LowBitLinear on `device`."""
    name = requested_backend()
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"IPEX_LLM_TF_BACKEND=cpu cannot run a tensor on {device}; unset it or use 'torch'")
    if name == "triton" and device.type not in ("cuda", "xpu"):
        raise ValueError(f"IPEX_LLM_TF_BACKEND=triton needs a CUDA or XPU tensor, got one on {device}")
    if name != "auto":
        return name
    if device.type == "cpu":
        return "cpu"
    if device.type in ("cuda", "xpu") and triton_available():
        return "triton"
    return "torch"


def _version(tensor: torch.Tensor) -> int:
    """In-place write counter of a tensor; inference-mode tensors have none (they cannot be written in place later)."""
    return -1 if tensor.is_inference() else tensor._version


class PackedCache:
    """Derived kernel layouts of one layer, rebuilt when its stored tensors change (device move, load)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value = None

    def get(self, parts: Parts, build):
        """The cached value for these exact tensors, building it on first use."""
        key = tuple((t.data_ptr(), _version(t), t.device) for t in parts.values())
        if key != self.key:
            self.value, self.key = build(), key
        return self.value


def linear_cpu(x2d: torch.Tensor, fmt: LowBitFormat, parts: Parts, bias: torch.Tensor | None,
               out_features: int, cache: PackedCache) -> torch.Tensor:
    """CPU matmul: packed int4 kernel for small batches of ggml formats, else dequantize to bf16 + GEMM."""
    if x2d.shape[0] < CPU_GEMM_MIN_ROWS and cpu_int4.supports(fmt, out_features):
        planes = cache.get(parts, lambda: cpu_int4.pack_planes(fmt, parts))
        y = cpu_int4.matmul_planes(x2d, planes, out_features)
    else:
        compute = torch.bfloat16 if x2d.dtype in (torch.float32, torch.bfloat16) else x2d.dtype
        y = F.linear(x2d.to(compute), fmt.dequantize(parts, dtype=compute))
    y = y.to(x2d.dtype)
    return y if bias is None else y.add_(bias.to(y.dtype))


def low_bit_linear(x: torch.Tensor, fmt: LowBitFormat, parts: Parts, bias: torch.Tensor | None,
                   out_features: int, cache: PackedCache) -> torch.Tensor:
    """y = x @ W.T + b for a packed weight, on whatever backend suits x's device."""
    backend = backend_for(x.device)
    if backend == "torch" or not x.is_floating_point():
        return linear_reference(x, fmt, parts, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if backend == "cpu":
        y = linear_cpu(x2d, fmt, parts, bias, out_features, cache)
    else:
        from . import triton_linear  # imported lazily: Triton is absent on CPU-only installs
        y = triton_linear.linear(x2d, fmt, parts, bias, out_features, cache)
    return y.reshape(*lead, out_features)
