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

# At and above this many rows (counted once per int4 plane: Q4_* are one plane, Q5_* and Q8_0 two) the CPU path
# dequantizes once to bf16 and uses the BLAS GEMM, which beats the packed int4 kernel for prefill-sized inputs: the
# kernel's time grows with rows x planes (~0.2 ms per row and plane for 4096x4096 on 2 threads) while dequantize +
# GEMM is mostly the fixed dequantize (6-12 ms). Crossovers measured for 4096x4096 with torch 2.13 on the 2-core CI
# machine (packed kernel vs dequantize + F.linear, as benchmarks/bench_linear.py times them), 2 threads / 1 thread:
# sym_int4 ~64 / 56, asym_int4 ~48 / 40, sym_int5 ~40 / 18, asym_int5 ~28 / 28, sym_int8 ~16 / 12 rows.
CPU_GEMM_MIN_ROWS = 48


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


class PackedCache:
    """Derived kernel layouts of one layer (e.g. PyTorch's int4 packing), built on first use.

    The owning module calls invalidate() whenever its stored tensors change (load, device move); no per-call key is
    computed, which keeps the decode path cheap and traceable by torch.compile.
    """

    def __init__(self) -> None:
        self.value = None

    def get(self, parts: Parts, build):
        """The cached value, building it on first use."""
        if self.value is None:
            self.value = build()
        return self.value

    def invalidate(self) -> None:
        """Forget the derived layout; the next call rebuilds it from the stored tensors."""
        self.value = None


def linear_cpu(x2d: torch.Tensor, fmt: LowBitFormat, parts: Parts, bias: torch.Tensor | None,
               out_features: int, cache: PackedCache) -> torch.Tensor:
    """CPU matmul: packed int4 kernel for small batches of ggml formats, else dequantize to bf16 + GEMM."""
    n_planes = 1 if fmt.name in ("sym_int4", "asym_int4") else 2  # as cpu_int4.pack_planes splits the codes
    if x2d.shape[0] * n_planes < CPU_GEMM_MIN_ROWS and cpu_int4.supports(fmt, out_features):
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
