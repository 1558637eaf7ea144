"""Kernel dispatch: pick the matmul for a LowBitLinear by device, format and IPEX_LLM_TF_BACKEND.

Backends: "torch" (the reference, any device), "cpu" (PyTorch's packed int4 kernel where the format maps onto it,
else dequantize + matmul), "triton" (CUDA and XPU, when Triton is importable), "ipex" (the fused-model ops rms_norm,
rotary and silu_mul from intel-extension-for-pytorch; matmuls as "auto", since ipex has no kernel for our formats).
IPEX_LLM_TF_BACKEND=torch forces the reference everywhere, for debugging; the default "auto" picks the fastest
available path per device, and takes an ipex op only where AUTO_IPEX_OPS says it measured faster than ours.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..env import raw_env_reader
from ..formats import LowBitFormat, Parts
from . import cpu_int4, ipex_ops, torch_fast
from .reference import (decode_attention_reference, linear_reference, next_greedy_inputs_reference,
                        quantize_kv_vectors, rms_norm_reference, rope_angles_reference, rotary_reference,
                        silu_and_mul_reference)

BACKENDS = ("auto", "torch", "cpu", "triton", "ipex")

# Fused-model ops that "auto" hands to ipex when it is installed, per device type: only those that
# benchmarks/bench_ipex_ops.py measured faster than ours (torch 2.8 + ipex 2.8 CPU, 1 thread; see README).
AUTO_IPEX_OPS: dict[str, frozenset[str]] = {"cpu": frozenset({"rms_norm"})}

# At and above this many rows (counted once per int4 plane: Q4_* are one plane, Q5_* and Q8_0 two) the CPU path
# dequantizes once to bf16 and uses the BLAS GEMM, which beats the packed int4 kernel for prefill-sized inputs: the
# kernel's time grows with rows x planes (~0.2 ms per row and plane for 4096x4096 on 2 threads) while dequantize +
# GEMM is mostly the fixed dequantize (6-12 ms). Crossovers measured for 4096x4096 with torch 2.13 on the 2-core CI
# machine (packed kernel vs dequantize + F.linear, as benchmarks/bench_linear.py times them), 2 threads / 1 thread:
# sym_int4 ~64 / 56, asym_int4 ~48 / 40, sym_int5 ~40 / 18, asym_int5 ~28 / 28, sym_int8 ~16 / 12 rows.
CPU_GEMM_MIN_ROWS = 48


_PARSED_BACKENDS: dict[object, str] = {}

# the backend is asked ~300 times per decoded token
_raw_backend = raw_env_reader("IPEX_LLM_TF_BACKEND")


def opaque_under_compile(x: torch.Tensor) -> bool:
    """Whether a kernel on x should enter a torch.compile graph as its custom op: on accelerators (Dynamo cannot
    trace a Triton launch), not on the CPU, where the ops are plain torch that Inductor traces and fuses."""
    return torch.compiler.is_compiling() and x.device.type != "cpu"


def requested_backend() -> str:
    """The backend named by IPEX_LLM_TF_BACKEND (default "auto"); ValueError for an unknown name."""
    raw = _raw_backend()
    name = _PARSED_BACKENDS.get(raw)  # asked once per op and matmul: parse each distinct value once
    if name is None:
        text = os.environ.get("IPEX_LLM_TF_BACKEND", "auto")
        name = text.strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"IPEX_LLM_TF_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)}")
        _PARSED_BACKENDS[raw] = name
    return name


@functools.lru_cache(maxsize=None)
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
    if name == "ipex":
        ipex_ops.require()
        name = "auto"  # ipex runs the fused-model ops; the low-bit matmuls keep our kernels
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
        self.cpu_planes: list | None = None  # the value, when it is the CPU int4 kernel's planes (the fast path)
        # what runs before this layer in a decode step (decode_context), for autotuning to time candidates after it
        self.decode_context = None

    def get(self, parts: Parts, build):
        """The cached value, building it on first use."""
        if self.value is None:
            self.value = build()
        return self.value

    def invalidate(self) -> None:
        """Forget the derived layout; the next call rebuilds it from the stored tensors."""
        self.value = self.cpu_planes = None


def cpu_int4_fits(x: torch.Tensor, planes: list) -> bool:
    """Whether the packed int4 kernel (not dequantize + GEMM) should run x on the CPU under the requested backend."""
    return (x.is_floating_point() and (x.numel() // x.shape[-1]) * len(planes) < CPU_GEMM_MIN_ROWS
            and requested_backend() in ("auto", "cpu"))


def cpu_int4_linear(x: torch.Tensor, planes: list, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """y = x @ W.T + b on the CPU through already packed int4 planes, in x's dtype (see cpu_int4_fits)."""
    y = cpu_int4.matmul_planes(x.reshape(-1, x.shape[-1]), planes, out_features).to(x.dtype)
    if bias is not None:
        y = y.add_(bias.to(y.dtype))
    return y.view(*x.shape[:-1], out_features)


def linear_cpu(x2d: torch.Tensor, fmt: LowBitFormat, parts: Parts, bias: torch.Tensor | None,
               out_features: int, cache: PackedCache) -> torch.Tensor:
    """CPU matmul: packed int4 kernel for small batches of ggml formats, else dequantize to bf16 + GEMM."""
    n_planes = 1 if fmt.name in ("sym_int4", "asym_int4") else 2  # as cpu_int4.pack_planes splits the codes
    if x2d.shape[0] * n_planes < CPU_GEMM_MIN_ROWS and cpu_int4.supports(fmt, out_features):
        planes = cache.get(parts, lambda: cpu_int4.pack_planes(fmt, parts))
        cache.cpu_planes = planes
        return cpu_int4_linear(x2d, planes, bias, out_features)
    compute = torch.bfloat16 if x2d.dtype in (torch.float32, torch.bfloat16) else x2d.dtype
    y = F.linear(x2d.to(compute), fmt.dequantize(parts, dtype=compute)).to(x2d.dtype)
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


def low_bit_linear_silu(x: torch.Tensor, fmt: LowBitFormat, parts: Parts, bias: torch.Tensor | None,
                        out_features: int, cache: PackedCache) -> torch.Tensor | None:
    """SiLU(gate) * up of a merged [gate | up] packed weight as one kernel where one exists (the Triton GEMV of a
    block format, for decode rows); None otherwise, for the caller to run low_bit_linear and then silu_and_mul."""
    if (not x.is_floating_point() or backend_for(x.device) != "triton"
            or op_backend("silu_mul", x.device) != "triton"):
        return None
    from . import triton_linear
    y = triton_linear.linear_silu(x.reshape(-1, x.shape[-1]), fmt, parts, bias, out_features, cache)
    return None if y is None else y.reshape(*x.shape[:-1], out_features // 2)


# -- fused-model ops: rms_norm, rotary, silu_and_mul --------------------------------------------------------------------

_ipex_broken: list[str] = []


def _ipex_loads() -> bool:
    # "auto" must never break a model because an installed ipex fails to import (it pins torch): warn once, use ours
    if _ipex_broken:
        return False
    try:
        ipex_ops.functional()
    except ipex_ops.IpexUnavailableError as err:
        _ipex_broken.append(str(err))
        import logging
        logging.getLogger("ipex_llm_tf").warning("not using ipex ops: %s", err)
        return False
    return True


_OP_BACKENDS: dict[tuple[object, str, str], str] = {}


def op_backend(op: str, device: torch.device) -> str:
    """"triton", "ipex" or "torch": who runs the fused-model op `op` (one of ipex_ops.OPS) on `device` (README says why).
    """
    key = (_raw_backend(), op, device.type)
    chosen = _OP_BACKENDS.get(key)  # asked ~90 times per decoded token: decide once per setting, op and device
    if chosen is None:
        chosen = _OP_BACKENDS[key] = _choose_op_backend(op, device)
    return chosen


def _choose_op_backend(op: str, device: torch.device) -> str:
    name = requested_backend()
    if name == "ipex":
        ipex_ops.require()
        return "ipex"
    if name in ("auto", "triton") and device.type in ("cuda", "xpu") and triton_available():
        return "triton"
    if name == "auto" and op in AUTO_IPEX_OPS.get(device.type, ()) and ipex_ops.installed() and _ipex_loads():
        return "ipex"
    return "torch"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with transformers' Llama numerics, by Triton or ipex where selected and applicable."""
    backend = op_backend("rms_norm", x.device)
    if backend == "triton":
        from .triton_rms_norm import rms_norm as triton_rms_norm
        return triton_rms_norm(x, weight, eps)
    if backend == "ipex" and ipex_ops.rms_norm_applies(x, weight):
        return ipex_ops.rms_norm(x, weight, eps)
    if requested_backend() == "torch":
        return rms_norm_reference(x, weight, eps)
    return torch_fast.rms_norm(x, weight, eps)  # equal to the reference, fewer ops


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): one kernel with Triton, else the add and then rms_norm."""
    if op_backend("rms_norm", x.device) == "triton":
        from .triton_rms_norm import add_rms_norm as triton_add_rms_norm
        return triton_add_rms_norm(x, residual, weight, eps)
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def embed_rms_norm(ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(table[ids]), table[ids]): an embedding lookup and the first norm, one kernel with Triton."""
    if op_backend("rms_norm", table.device) == "triton":
        from .triton_rms_norm import embed_rms_norm as triton_embed_rms_norm
        return triton_embed_rms_norm(ids, table, weight, eps)
    gathered = F.embedding(ids, table)
    return rms_norm(gathered, weight, eps), gathered


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate_half layout) for x [batch, heads, seq, head_dim] from cos/sin [batch, seq, head_dim]."""
    backend = op_backend("rotary", x.device)
    if backend == "triton":
        from .triton_rotary import rotary as triton_rotary
        return triton_rotary(x, cos, sin)
    if backend == "ipex" and ipex_ops.rotary_applies(x, cos, sin):
        return ipex_ops.rotary(x, cos, sin)
    if requested_backend() == "torch":
        return rotary_reference(x, cos, sin)
    return torch_fast.rotary(x, cos, sin)  # equal to the reference, fewer ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a tensor holding [gate | up] along its last dim."""
    backend = op_backend("silu_mul", gate_up.device)
    if backend == "triton":
        from .triton_silu_mul import silu_and_mul as triton_silu_and_mul
        return triton_silu_and_mul(gate_up)
    if backend == "ipex":
        return ipex_ops.silu_mul(gate_up)
    return silu_and_mul_reference(gate_up)


def decode_attention_applies(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether decode_attention runs a fused kernel for these queries and this (4-D, boolean) mask."""
    if q.shape[2] != 1 or torch.compiler.is_compiling() or op_backend("decode_attention", q.device) != "triton":
        return False
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor | None,
                     scale: float, kv_scales: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> torch.Tensor:
    """One-query attention [B, H, 1, D] over k, v [B, H_kv, S, D] (float8 codes with kv_scales, or floats), keys
    masked by key_ok [B, S]: Triton on GPUs, SDPA elsewhere."""
    if op_backend("decode_attention", q.device) == "triton":
        from .triton_decode_attention import decode_attention as triton_decode_attention
        return triton_decode_attention(q, k, v, key_ok, scale, kv_scales)
    return decode_attention_reference(q, k, v, key_ok, scale, kv_scales)


def write_kv_slot(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  slot: torch.Tensor, scales: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> None:
    """keys[:, :, slot] = key, values[:, :, slot] = value (one token; slot a 1-element device tensor); with scales
    the planes hold float8 codes and `scales` their per-vector scale planes (quantize_kv_vectors)."""
    if op_backend("kv_write", key.device) == "triton":
        from .triton_kv_write import write_kv_slot as triton_write_kv_slot
        return triton_write_kv_slot(key, value, keys, values, slot, scales)
    if scales is None:
        keys.index_copy_(2, slot, key)
        values.index_copy_(2, slot, value)
        return
    for states, codes_plane, scale_plane in ((key, keys, scales[0]), (value, values, scales[1])):
        codes, scale = quantize_kv_vectors(states, codes_plane.dtype)
        codes_plane.view(torch.uint8).index_copy_(2, slot, codes.view(torch.uint8))  # no float8 index_copy on CPU
        scale_plane.index_copy_(2, slot, scale)


def rotary_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                        keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
                        scales: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> torch.Tensor:
    """RoPE on one token's merged projection qkv [B, 1, H + 2 H_kv, D] and its key and value written at `slot`
    (write_kv_slot): the rotated query [B, H, 1, D]. One Triton kernel where rotary and kv_write both run Triton."""
    if op_backend("kv_write", qkv.device) == "triton" and op_backend("rotary", qkv.device) == "triton":
        from .triton_kv_write import rotary_and_write_kv as triton_rotary_and_write_kv
        return triton_rotary_and_write_kv(qkv, cos, sin, heads, kv_heads, keys, values, slot, scales)
    query_key = rotary(qkv[:, :, :heads + kv_heads].transpose(1, 2), cos, sin)
    query, key = query_key.split([heads, kv_heads], dim=1)
    write_kv_slot(key, qkv[:, :, heads + kv_heads:].transpose(1, 2), keys, values, slot, scales)
    return query


def rotary_and_append_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                         keys: torch.Tensor, values: torch.Tensor, first_slot: int) -> torch.Tensor:
    """RoPE on S tokens' merged projection qkv [B, S, H + 2 H_kv, D], their keys and values written to float planes
    [B, H_kv, capacity, D] at slots first_slot onwards: the rotated query [B, H, S, D]. One Triton kernel where
    rotary and kv_write both run Triton, else rotary and two copies."""
    if op_backend("kv_write", qkv.device) == "triton" and op_backend("rotary", qkv.device) == "triton":
        from .triton_kv_write import rotary_and_append_kv as triton_rotary_and_append_kv
        return triton_rotary_and_append_kv(qkv, cos, sin, heads, kv_heads, keys, values, first_slot)
    query_key = rotary(qkv[:, :, :heads + kv_heads].transpose(1, 2), cos, sin)
    query, key = query_key.split([heads, kv_heads], dim=1)
    end = first_slot + qkv.shape[1]
    keys[:, :, first_slot:end] = key
    values[:, :, first_slot:end] = qkv[:, :, heads + kv_heads:].transpose(1, 2)
    return query


def rotary_attention_applies(qkv: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether rotary_decode_attention runs one fused kernel for this token's projection and (4-D, boolean) mask."""
    triton_ops = all(op_backend(op, qkv.device) == "triton" for op in ("kv_write", "rotary"))
    return triton_ops and decode_attention_applies(qkv.transpose(1, 2), mask)


def rotary_decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                            keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
                            key_ok: torch.Tensor | None, scale: float) -> torch.Tensor:
    """rotary_and_write_kv on one token's merged projection, then decode_attention of its query over the planes
    (float ones): [B, H, 1, D]. One Triton kernel where rotary_attention_applies, else the two calls."""
    if rotary_attention_applies(qkv, None):
        from .triton_decode_attention import rotary_decode_attention as triton_rotary_decode_attention
        return triton_rotary_decode_attention(qkv, cos, sin, heads, kv_heads, keys, values, slot, key_ok, scale)
    query = rotary_and_write_kv(qkv, cos, sin, heads, kv_heads, keys, values, slot)
    return decode_attention(query, keys, values, key_ok, scale)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's (cos, sin) [*positions.shape, 2 * len(inv_freq)] for integer positions, as transformers' Llama rotary
    embedding computes them; one Triton kernel on GPUs."""
    if op_backend("rope_angles", positions.device) == "triton":
        from .triton_rope_angles import rope_angles as triton_rope_angles
        return triton_rope_angles(positions, inv_freq, scaling, dtype)
    return rope_angles_reference(positions, inv_freq, scaling, dtype)


def next_greedy_inputs(logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, key_ok: torch.Tensor,
                       slot: torch.Tensor, length: int, copy_to: torch.Tensor | None = None) -> None:
    """In place: ids = each row of logits [B, V]'s argmax, positions + 1, key_ok[:, length] = True, slot = length
    (a greedy step's static inputs for the next token), and copy_to = logits if given; one Triton kernel on GPUs."""
    if op_backend("greedy_inputs", logits.device) == "triton":
        from .triton_greedy_inputs import next_greedy_inputs as triton_next_greedy_inputs
        return triton_next_greedy_inputs(logits, ids, positions, key_ok, slot, length, copy_to)
    return next_greedy_inputs_reference(logits, ids, positions, key_ok, slot, length, copy_to)


def describe_op_backends(device: torch.device) -> list[str]:
    """One line per fused-model op: the implementation it gets on `device` and why (for `ipex-llm-tf info`)."""
    name = requested_backend()
    lines = []
    for op in ipex_ops.OPS:
        if name == "ipex":
            why = ("IPEX_LLM_TF_BACKEND=ipex" if ipex_ops.installed()
                   else "IPEX_LLM_TF_BACKEND=ipex, but ipex is not installed: calls raise IpexUnavailableError")
            lines.append(f"{op}: ipex ({why})")
        elif name in ("auto", "triton") and device.type in ("cuda", "xpu") and triton_available():
            lines.append(f"{op}: triton (fused kernel, one source for CUDA and XPU)")
        elif name != "auto":
            lines.append(f"{op}: torch (IPEX_LLM_TF_BACKEND={name})")
        elif op not in AUTO_IPEX_OPS.get(device.type, ()):
            why = {"cpu": "ours measured faster than ipex's on the CPU",
                   "cuda": "ipex has no CUDA ops"}.get(device.type, f"ipex not measured on {device.type}; "
                                                                     f"IPEX_LLM_TF_BACKEND=ipex selects it")
            lines.append(f"{op}: torch ({why})")
        elif not ipex_ops.installed():
            lines.append(f"{op}: torch (ipex would win here, but intel-extension-for-pytorch is not installed)")
        else:
            lines.append(f"{op}: ipex (installed, and measured faster than ours on {device.type})")
    return lines
