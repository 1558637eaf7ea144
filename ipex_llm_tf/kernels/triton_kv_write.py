"""Write one decode step's keys and values into a preallocated cache at a slot held on the device, in one kernel.

`rotary_and_write_kv` does RoPE as well, on the merged q/k/v projection of the token: query heads come back rotated,
key heads are rotated and written, value heads written, all by one kernel where a graph step ran two (triton_rotary,
then the write). Each product and the sum round as triton_rotary's do (both compiled without fused multiply-adds),
so the results are the same bits.

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

from .grids import next_power_of_2
from .launch_overlap import overlap_options, release_next, wait_previous
from .triton_rotary import rotate_halves


@triton.jit
def _e4m3_scale(top):
    """A vector's float8 scale from its largest magnitude: top / 448, top clamped above zero (Fp8BlockKVLayer's)."""
    return tl.maximum(top, 1.1754943508222875e-38) / 448.0


@triton.jit
def _store_vector(x, dst, scale_dst, inside, QUANT: tl.constexpr):
    if QUANT:
        xf = x.to(tl.float32)
        scale = _e4m3_scale(tl.max(tl.abs(xf), axis=0))
        tl.store(dst, tl.math.div_rn(xf, scale).to(dst.dtype.element_ty), mask=inside)
        tl.store(scale_dst, scale)
    else:
        tl.store(dst, x, mask=inside)


@triton.jit
def _store_halves(x1, x2, dst, scale_dst, half, inside, QUANT: tl.constexpr):
    """_store_vector for a vector given as its two halves (the rotary pairing keeps them apart)."""
    if QUANT:
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        scale = _e4m3_scale(tl.maximum(tl.max(tl.abs(x1f), axis=0), tl.max(tl.abs(x2f), axis=0)))
        tl.store(dst, tl.math.div_rn(x1f, scale).to(dst.dtype.element_ty), mask=inside)
        tl.store(dst + half, tl.math.div_rn(x2f, scale).to(dst.dtype.element_ty), mask=inside)
        tl.store(scale_dst, scale)
    else:
        tl.store(dst, x1, mask=inside)
        tl.store(dst + half, x2, mask=inside)


@triton.jit
def _rotary_kv_write_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, first_slot,
                            heads, kv_heads, half, sxb, sxs, sxh, scb, scs, ssb, sss, sqb, sqh, sqs,
                            kcb, kch, kcs, vcb, vch, vcs, ksb, ksh, kss, vsb, vsh, vss,
                            BLOCK_D: tl.constexpr, QUANT: tl.constexpr, DEVICE_SLOT: tl.constexpr = True,
                            OVERLAP: tl.constexpr = False):
    """Program (batch row, head of the merged projection; token): a query head rotated into q, a key head rotated
    into the key plane at the token's slot, a value head copied into the value plane. Token s goes to slot
    first + s, first read from slot_ptr (DEVICE_SLOT: a graph step's) or given as first_slot."""
    release_next(OVERLAP)
    wait_previous(OVERLAP)
    per_row = heads + 2 * kv_heads
    b = (tl.program_id(0) // per_row).to(tl.int64)
    h = tl.program_id(0) % per_row
    s = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    inside = d < half
    src = x_ptr + b * sxb + s * sxs + h.to(tl.int64) * sxh + d
    x1 = tl.load(src, mask=inside, other=0.0)
    x2 = tl.load(src + half, mask=inside, other=0.0)
    if DEVICE_SLOT:
        slot = tl.load(slot_ptr).to(tl.int64) + s
    else:
        slot = s + first_slot
    if h < heads + kv_heads:
        trig_c, trig_s = cos_ptr + b * scb + s * scs + d, sin_ptr + b * ssb + s * sss + d
        c1, c2 = tl.load(trig_c, mask=inside, other=0.0), tl.load(trig_c + half, mask=inside, other=0.0)
        s1, s2 = tl.load(trig_s, mask=inside, other=0.0), tl.load(trig_s + half, mask=inside, other=0.0)
        y1, y2 = rotate_halves(x1, x2, c1, c2, s1, s2)
        if h < heads:
            dst = q_ptr + b * sqb + h.to(tl.int64) * sqh + s * sqs + d
            tl.store(dst, y1, mask=inside)
            tl.store(dst + half, y2, mask=inside)
        else:
            kvh = (h - heads).to(tl.int64)
            _store_halves(y1, y2, kc_ptr + b * kcb + kvh * kch + slot * kcs + d, ks_ptr + b * ksb + kvh * ksh
                          + slot * kss, half, inside, QUANT)
    else:
        kvh = (h - heads - kv_heads).to(tl.int64)
        _store_halves(x1, x2, vc_ptr + b * vcb + kvh * vch + slot * vcs + d, vs_ptr + b * vsb + kvh * vsh
                      + slot * vss, half, inside, QUANT)


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
            BLOCK_D=next_power_of_2(dim), QUANT=quant, num_warps=1, enable_fp_fusion=True)


def merged_token_operands(caller: str, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                          kv_heads: int, keys: torch.Tensor, values: torch.Tensor, quant: bool,
                          one_token: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv with a unit last stride and cos / sin as [B, S, D] of its dtype, after checking a merged projection
    [B, S, H + 2 H_kv, D] (one_token: S = 1) against the cache planes [B, H_kv, capacity, D] (ValueError naming
    `caller`)."""
    batch, tokens, total, dim = qkv.shape
    if (one_token and tokens != 1) or total != heads + 2 * kv_heads or dim % 2 \
            or keys.shape[:2] != (batch, kv_heads) or keys.shape != values.shape or keys.shape[3] != dim \
            or keys.dtype != values.dtype or (keys.dtype != qkv.dtype and not quant):
        shape = "one token's qkv [B, 1, H + 2 H_kv, D]" if one_token else "qkv [B, S, H + 2 H_kv, D]"
        raise ValueError(f"{caller} takes {shape} (even D) and planes [B, H_kv, S, D] of its dtype, got "
                         f"{tuple(qkv.shape)} {qkv.dtype} with H={heads}, H_kv={kv_heads} and planes "
                         f"{tuple(keys.shape)} {keys.dtype}")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"{caller} needs cache planes with a unit last stride")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = (t.to(qkv.dtype).reshape(-1, tokens, dim).expand(batch, tokens, dim) for t in (cos, sin))
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return qkv, cos, sin


def _rotary_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                     keys: torch.Tensor, values: torch.Tensor, slot: "torch.Tensor | int",
                     scales: "tuple[torch.Tensor, torch.Tensor] | None") -> torch.Tensor:
    """The launch behind rotary_and_write_kv and rotary_and_append_kv, on checked operands (merged_token_operands);
    slot: the first token's slot, a device tensor [1] or an int."""
    batch, tokens, total, dim = qkv.shape
    quant = scales is not None
    query = torch.empty((batch, heads, tokens, dim), dtype=qkv.dtype, device=qkv.device)
    key_scales, value_scales = scales if quant else (keys, values)
    device_slot = isinstance(slot, torch.Tensor)
    if query.numel():
        _rotary_kv_write_kernel[(batch * total, tokens)](
            qkv, cos, sin, query, keys, values, key_scales, value_scales, slot if device_slot else qkv,
            0 if device_slot else slot, heads, kv_heads, dim // 2, qkv.stride(0), qkv.stride(1), qkv.stride(2),
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), query.stride(0), query.stride(1),
            query.stride(2), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1),
            values.stride(2), key_scales.stride(0), key_scales.stride(1), key_scales.stride(2),
            value_scales.stride(0), value_scales.stride(1), value_scales.stride(2),
            BLOCK_D=next_power_of_2(dim // 2), QUANT=quant, DEVICE_SLOT=device_slot, num_warps=1,
            enable_fp_fusion=False,  # no fused multiply-adds: RoPE rounds as triton_rotary does
            **overlap_options(qkv.device))
    return query


def rotary_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                        keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
                        scales: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> torch.Tensor:
    """RoPE and the cache write of one token's merged projection qkv [B, 1, H + 2 H_kv, D] (cos / sin [B or 1, 1,
    D]): returns the rotated query [B, H, 1, D]; the rotated key and the value go to planes [B, H_kv, S, D] at
    `slot` (float8 codes with `scales`, as write_kv_slot)."""
    qkv, cos, sin = merged_token_operands("rotary_and_write_kv", qkv, cos, sin, heads, kv_heads, keys, values,
                                          scales is not None)
    return _rotary_kv_write(qkv, cos, sin, heads, kv_heads, keys, values, slot, scales)


def rotary_and_append_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                         keys: torch.Tensor, values: torch.Tensor, first_slot: int) -> torch.Tensor:
    """rotary_and_write_kv for S tokens qkv [B, S, H + 2 H_kv, D] (cos / sin [B or 1, S, D]) written to slots
    first_slot .. first_slot + S - 1 of float planes: a prompt's RoPE and cache write in one kernel."""
    if first_slot < 0 or first_slot + qkv.shape[1] > keys.shape[2]:
        raise ValueError(f"rotary_and_append_kv: slots {first_slot}..{first_slot + qkv.shape[1] - 1} are not all "
                         f"inside planes of {keys.shape[2]} slots")
    qkv, cos, sin = merged_token_operands("rotary_and_append_kv", qkv, cos, sin, heads, kv_heads, keys, values,
                                          False, one_token=False)
    return _rotary_kv_write(qkv, cos, sin, heads, kv_heads, keys, values, first_slot, None)
