"""Write one decode step's keys and values into a preallocated cache at a slot held on the device, in one kernel.

Reference: two index_copy_ calls (kernels.write_kv_slot off the Triton backend). The slot is a device tensor, so a
recorded CUDA graph writes wherever the replayed step says. key / value [batch, kv_heads, 1, head_dim] may be strided
views (the value is a slice of the merged projection); the planes [batch, kv_heads, capacity, head_dim] need a unit
last stride. With float8 planes each head's vector is quantized as models.kv_cache.Fp8BlockKVLayer does it (scale =
max |x| / 448, clamped above zero; codes = x / scale rounded to e4m3) and its scale written to a [..., 1] float32
plane; that needs Triton's float8 conversion (CUDA sm_89+, kernels.triton_linear.fp8_native). Plain tl ops
otherwise: CUDA, XPU and the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_vector(x, dst, scale_dst, inside, QUANT: tl.constexpr):
    if QUANT:
        xf = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(xf), axis=0), 1.1754943508222875e-38) / 448.0
        tl.store(dst, tl.math.div_rn(xf, scale).to(dst.dtype.element_ty), mask=inside)
        tl.store(scale_dst, scale)
    else:
        tl.store(dst, x, mask=inside)


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, heads, D,
                     skb, skh, svb, svh, kcb, kch, kcs, vcb, vch, vcs, ksb, ksh, kss, vsb, vsh, vss,
                     BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    slot = tl.load(slot_ptr).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    inside = d < D
    k = tl.load(k_ptr + b * skb + h * skh + d, mask=inside, other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + d, mask=inside, other=0.0)
    _store_vector(k, kc_ptr + b * kcb + h * kch + slot * kcs + d, ks_ptr + b * ksb + h * ksh + slot * kss, inside,
                  QUANT)
    _store_vector(v, vc_ptr + b * vcb + h * vch + slot * vcs + d, vs_ptr + b * vsb + h * vsh + slot * vss, inside,
                  QUANT)


def write_kv_slot(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  slot: torch.Tensor, scales: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> None:
    """keys[:, :, slot] = key and values[:, :, slot] = value for one-token key / value [B, H_kv, 1, D]; with
    `scales` (float32 [B, H_kv, S, 1] planes) the planes are float8 and get codes, the scale planes their scales."""
    batch, heads, tokens, dim = key.shape
    quant = scales is not None
    if tokens != 1 or value.shape != key.shape or keys.shape[:2] != key.shape[:2] or keys.shape != values.shape \
            or keys.shape[3] != dim or keys.dtype != values.dtype or (keys.dtype != key.dtype and not quant):
        raise ValueError(f"write_kv_slot takes one-token key/value [B, H, 1, D] and planes [B, H, S, D] of their dtype, "
                         f"got {tuple(key.shape)} {key.dtype}, {tuple(value.shape)}, {tuple(keys.shape)} {keys.dtype}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("write_kv_slot needs cache planes with a unit last stride")
    key_scales, value_scales = scales if quant else (keys, values)
    if key.numel():
        _kv_write_kernel[(batch * heads,)](
            key, value, keys, values, key_scales, value_scales, slot, heads, dim,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
            key_scales.stride(0), key_scales.stride(1), key_scales.stride(2),
            value_scales.stride(0), value_scales.stride(1), value_scales.stride(2),
            BLOCK_D=triton.next_power_of_2(dim), QUANT=quant, num_warps=1)
