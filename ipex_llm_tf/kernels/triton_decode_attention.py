"""One-query (decode) attention as Triton kernels: the keys split over programs, and the last program of a query to
finish combines the splits (an arrival counter per query, left at zero for the next call; a second kernel does it
instead while a graph is being captured and no counters exist yet).

Reference: decode_attention_reference (PyTorch's SDPA). q [batch, heads, 1, head_dim]; k, v [batch, kv_heads, keys,
head_dim] with a unit last stride (the first `keys` slots of a preallocated cache are such views); key_ok [batch,
keys] (True where a key may be attended) or None. Query head h reads KV head h // (heads / kv_heads). Scores,
softmax and the weighted sum are float32; the output is q's dtype. k and v may instead be float8 e4m3 codes with a
float32 scale per key and head (kv_scales, planes [batch, kv_heads, keys, 1], as models.kv_cache.Fp8BlockKVLayer
stores them): the key's scale multiplies its score and the value's scale its softmax weight, so no dequantized copy
of the cache is ever made.

rotary_decode_attention runs the same kernel on one token's merged q/k/v projection: RoPE and the write of the
token's key and value into float planes happen inside it (a graph step's work of triton_kv_write.rotary_and_write_kv,
one kernel boundary fewer a layer: 2.0989 -> 2.0912 ms a Llama-2-7B sym_int4 step on an H100), with the same bits.
Nothing the projection writes is in the planes or the mask, so this variant reads its first block of keys and values
before it waits for the projection (launch_overlap), and writes the token's slot only after its loop, so that no
read waits behind that store. H100, the same step, graph replays (docs/gpu-log.md, session 21): reading every key
of the span before the wait (the mask's wait removed) was level with session 20's kernel at a 256-slot span and
2.6530 -> 2.6041 ms after a 1984-token prompt; reading only the keys the mask allows, still before the wait, then
took 2.0430 -> 2.0186 ms and 2.5222 -> 2.4967 ms.

Why not SDPA: given a mask, PyTorch runs its memory-efficient kernel, which for a single query keeps one program per
head walking every key (13.5 us per Llama-2-7B layer on an H100, ~12% of a graph-replayed token) and converts the
boolean mask to an additive one first (two more kernels). Here each program covers a slice of the keys, so the
device fills even at batch 1, and the mask is read as it is. Plain tl ops: CUDA, XPU and the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arrivals import ArrivalCounters
from .grids import next_power_of_2
from .launch_overlap import overlap_options, release_next, wait_previous
from .triton_gemv_fp8 import fp8_bytes_to_float
from .triton_linear import fp8_native, sm_count
from .triton_kv_write import merged_token_operands
from .triton_rotary import rotate_whole

BLOCK_S = 32  # keys per step of a program (host side)
# running-max start: finite, so a split whose keys are all masked yields weight 0, not NaN
_NO_SCORE = tl.constexpr(-1.0e30)


@triton.jit
def _load_block(k_base, v_base, ok_row, s0, end, sks, svs, d, on_d, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr):
    """The BLOCK_S keys from s0 (rows of the [keys, D] planes, as stored), their values, and which may be attended.

    Only keys the mask allows are read: the slots past a sequence's end are a large part of a short span, and
    reading them too, so that the planes' loads need not wait for the mask's, made the kernel slower (session 8:
    4.52 -> 5.26 us a call). The RoPE variant hides that wait instead, by reading its first block before the
    previous kernel is done."""
    s = s0 + tl.arange(0, BLOCK_S)
    valid = s < end
    if HAS_MASK:
        valid = valid & (tl.load(ok_row + s, mask=valid, other=0) != 0)
    tile = valid[:, None] & on_d[None, :]
    rows = s[:, None].to(tl.int64)
    k = tl.load(k_base + rows * sks + d[None, :], mask=tile)
    v = tl.load(v_base + rows * svs + d[None, :], mask=tile)
    return k, v, valid


@triton.jit
def _as_float(x, tile, FP8: tl.constexpr, NATIVE: tl.constexpr):
    """Loaded plane rows as float32 (float8 codes as their e4m3 values, bit-decoded unless NATIVE), zero outside
    `tile`."""
    if FP8:
        x = fp8_bytes_to_float(x, False, NATIVE, tl.float32)
        if not NATIVE:
            x = x * 256.0  # the bit decoding leaves e4m3 2**-8 too small (fp8_bytes_to_float)
    # masked lanes are undefined (a float8 NaN code would survive a zero softmax weight)
    return tl.where(tile, x.to(tl.float32), 0.0)


@triton.jit(do_not_specialize=["zero"])
def _split_kernel(q_ptr, k_ptr, v_ptr, ok_ptr, ks_ptr, vs_ptr, part_ptr, ml_ptr, out_ptr, arrived_ptr,
                  cos_ptr, sin_ptr, slot_ptr, zero,
                  heads, groups, keys, keys_per_split, scale,
                  sqb, sqh, scb, ssb, skb, skh, sks, svb, svh, svs, sokb, sksb, sksh, skss, svsb, svsh, svss,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
                  DIRECT: tl.constexpr, FP8: tl.constexpr, NATIVE: tl.constexpr, LAST_COMBINES: tl.constexpr,
                  BLOCK_P: tl.constexpr, OVERLAP: tl.constexpr = False, ROTARY: tl.constexpr = False):
    """Online softmax of query (batch, head) = program 0 over its split of the keys (program 1).

    DIRECT (one split): write the normalised output; else the unnormalised sum, its running max and its weight, and
    with LAST_COMBINES the query's last program to arrive (arrived_ptr counts them) combines all of them.

    ROTARY: q_ptr is one token's merged q/k/v projection (heads, then kv heads of keys, then of values; sqh apart).
    The query gets RoPE here (cos / sin rows scb / ssb apart), and the split holding the cache slot at slot_ptr
    rotates the token's key, uses it and its value in place of what the planes held there, and its first query
    head of each KV head writes both into the planes: triton_kv_write.rotary_and_write_kv's work, with its roundings
    (zero: a run-time 0, triton_rotary.rotate_whole).
    """
    release_next(OVERLAP)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    kvh = ((bh % heads) // groups).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    on_d = d < D
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    ok_row = ok_ptr + b * sokb
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, keys)
    if ROTARY:
        # the planes and the mask are earlier steps' writes, not the previous kernel's (that is the projection,
        # and this kernel writes the token's slot itself), so the first keys are read before the wait
        n_k, n_v, n_valid = _load_block(k_base, v_base, ok_row, start, end, sks, svs, d, on_d, BLOCK_S, HAS_MASK)
    wait_previous(OVERLAP)
    if not ROTARY:
        n_k, n_v, n_valid = _load_block(k_base, v_base, ok_row, start, end, sks, svs, d, on_d, BLOCK_S, HAS_MASK)
    q_head = q_ptr + b * sqb + (bh % heads).to(tl.int64) * sqh
    if ROTARY:
        first_half = d < D // 2
        partner = tl.where(first_half, d + D // 2, d - D // 2)
        c = tl.load(cos_ptr + b * scb + d, mask=on_d, other=0.0)
        s_ = tl.load(sin_ptr + b * ssb + d, mask=on_d, other=0.0)
        q = rotate_whole(tl.load(q_head + d, mask=on_d, other=0.0), tl.load(q_head + partner, mask=on_d, other=0.0),
                         c, s_, first_half, zero)
        slot = tl.load(slot_ptr).to(tl.int32)
        # every program reads the token's key and value (no wait for the slot); only the split holding it uses them
        k_head = q_ptr + b * sqb + (heads + kvh) * sqh
        v_head = q_ptr + b * sqb + (heads + heads // groups + kvh) * sqh
        new_k = rotate_whole(tl.load(k_head + d, mask=on_d, other=0.0), tl.load(k_head + partner, mask=on_d,
                                                                                 other=0.0), c, s_, first_half, zero)
        new_v = tl.load(v_head + d, mask=on_d, other=0.0)
        token_k, token_v = new_k.to(tl.float32)[None, :], new_v.to(tl.float32)[None, :]
    else:
        q = tl.load(q_head + d, mask=on_d, other=0.0)
    q = q.to(tl.float32) * scale
    m = tl.full([], _NO_SCORE, tl.float32)
    weight = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        k, v, valid = n_k, n_v, n_valid
        # the next keys are read while these are summed (past `end` the loads are masked off)
        n_k, n_v, n_valid = _load_block(k_base, v_base, ok_row, s0 + BLOCK_S, end, sks, svs, d, on_d, BLOCK_S,
                                        HAS_MASK)
        tile = valid[:, None] & on_d[None, :]
        k = _as_float(k, tile, FP8, NATIVE)
        v = _as_float(v, tile, FP8, NATIVE)
        if ROTARY:
            token = (s == slot)[:, None] & tile
            k = tl.where(token, token_k, k)
            v = tl.where(token, token_v, v)
        scores = tl.sum(k * q[None, :], axis=1)
        if FP8:
            scores = scores * tl.load(ks_ptr + b * sksb + kvh * sksh + s * skss, mask=valid, other=0.0)
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        weight = weight * alpha + tl.sum(p, axis=0)
        if FP8:
            p = p * tl.load(vs_ptr + b * svsb + kvh * svsh + s * svss, mask=valid, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    if ROTARY:
        # written after the keys are read, so that no read waits behind these stores (the split that holds the
        # slot used the token's key and value in place of what the planes held there)
        lane_slot = slot + 0 * d  # lanes, not a scalar: the interpreter makes no store mask of a scalar comparison
        writes = on_d & (lane_slot >= start) & (lane_slot < end) & ((bh % heads) % groups + 0 * d == 0)
        tl.store(k_base + slot.to(tl.int64) * sks + d, new_k, mask=writes)
        tl.store(v_base + slot.to(tl.int64) * svs + d, new_v, mask=writes)
    if DIRECT:
        out = tl.where(weight > 0, acc / weight, 0.0)
        tl.store(out_ptr + bh.to(tl.int64) * D + d, out.to(out_ptr.dtype.element_ty), mask=on_d)
    else:
        splits = tl.num_programs(1)
        row = bh.to(tl.int64) * splits + split
        tl.store(part_ptr + row * D + d, acc, mask=on_d)
        tl.store(ml_ptr + row * 2, m)
        tl.store(ml_ptr + row * 2 + 1, weight)
        if LAST_COMBINES:
            # every thread's stores come before the arrival (the barrier); the release makes them visible to the
            # program that arrives last, whose acquire orders its reads after all of them
            tl.debug_barrier()
            before = tl.atomic_add(arrived_ptr + bh, 1, sem="acq_rel")
            if before == splits - 1:
                _combine(part_ptr, ml_ptr, out_ptr, bh.to(tl.int64), splits, D, BLOCK_D, BLOCK_P)
                tl.atomic_xchg(arrived_ptr + bh, 0, sem="relaxed")  # zero again; kernel boundaries order it


@triton.jit
def _combine_kernel(part_ptr, ml_ptr, out_ptr, splits,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """The combine of query program 0's splits, as a kernel of its own (see _combine)."""
    _combine(part_ptr, ml_ptr, out_ptr, tl.program_id(0).to(tl.int64), splits, D, BLOCK_D, BLOCK_P)


@triton.jit
def _combine(part_ptr, ml_ptr, out_ptr, bh, splits, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[bh] = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) weight_i over the splits i of query bh."""
    i = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    on_i = i < splits
    rows = bh * splits + i
    m = tl.load(ml_ptr + rows * 2, mask=on_i, other=_NO_SCORE)
    weight = tl.load(ml_ptr + rows * 2 + 1, mask=on_i, other=0.0)
    scale = tl.exp(m - tl.max(m, axis=0))
    acc = tl.load(part_ptr + rows[:, None] * D + d[None, :], mask=on_i[:, None] & (d < D)[None, :], other=0.0)
    total = tl.sum(weight * scale, axis=0)
    out = tl.sum(acc * scale[:, None], axis=0)
    out = tl.where(total > 0, out / total, 0.0)
    tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


# the combine's counters: attention calls on one device run one after another (decode is one stream)
_ARRIVALS = ArrivalCounters()


# Key splits per query wanted at least, when the keys allow: a query's keys are read by a chain of dependent loads,
# so more, shorter chains beat filling the device just twice (H100, session 13, 7B shape, 32 layers' caches in a
# graph: batch 1 at 512-4096 keys 10-27% faster than two programs per SM, batch 4 up to 18%; level at 256 keys).
MIN_SPLITS = 16


def _splits(programs: int, keys: int, device: torch.device) -> int:
    """Key splits per query: at least MIN_SPLITS and about two programs per multiprocessor, BLOCK_S keys or more
    each."""
    wanted = max(MIN_SPLITS, -(-2 * sm_count(device) // max(1, programs)))
    return max(1, min(wanted, -(-keys // BLOCK_S)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor | None,
                     scale: float, kv_scales: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked by key_ok) v for one query per head: [batch, heads, 1, head_dim]."""
    batch, heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    if q_len != 1 or heads % kv_heads or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"decode_attention takes q [B, H, 1, D] and k, v [B, H_kv, S, D] with H_kv dividing H, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    fp8 = k.dtype == torch.float8_e4m3fn
    if fp8 != (kv_scales is not None) or v.dtype != k.dtype:
        raise ValueError(f"decode_attention reads float8 e4m3 keys and values with kv_scales, or neither; got "
                         f"{k.dtype} / {v.dtype} keys / values and kv_scales={'given' if kv_scales else None}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _attend(q, (q.stride(0), q.stride(1)), heads, k, v, key_ok, scale, kv_scales)


def rotary_decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                            keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, key_ok: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """triton_kv_write.rotary_and_write_kv, then decode_attention of its query over the planes, as one kernel with
    the same results bit for bit: qkv [B, 1, H + 2 H_kv, D] one token's merged projection, keys / values [B, H_kv,
    S, D] float planes that get its rotated key and its value at `slot` (a device tensor, below S)."""
    if heads % max(kv_heads, 1):
        raise ValueError(f"rotary_decode_attention needs H_kv dividing H, got H={heads}, H_kv={kv_heads}")
    qkv, cos, sin = merged_token_operands("rotary_decode_attention", qkv, cos, sin, heads, kv_heads, keys, values,
                                          quant=False)
    return _attend(qkv, (qkv.stride(0), qkv.stride(2)), heads, keys, values, key_ok, scale, None, (cos, sin, slot))


def _attend(q: torch.Tensor, q_strides: tuple[int, int], heads: int, k: torch.Tensor, v: torch.Tensor,
            key_ok: torch.Tensor | None, scale: float, kv_scales: "tuple[torch.Tensor, torch.Tensor] | None",
            rotary: "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None" = None) -> torch.Tensor:
    """Launch the split kernel for query heads `heads` rows apart by q_strides (batch, head); checked operands."""
    batch, kv_heads, keys, dim = k.shape
    out = torch.empty((batch, heads, 1, dim), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    fp8 = kv_scales is not None
    ok = key_ok
    if ok is not None:
        ok = ok.view(torch.uint8) if ok.dtype == torch.bool else ok
        if ok.stride(-1) != 1:
            ok = ok.contiguous()
    native = fp8 and fp8_native(q.device)
    if fp8 and not native:
        k, v = k.view(torch.uint8), v.view(torch.uint8)
    k_scales, v_scales = kv_scales if fp8 else (q, q)
    cos, sin, slot = rotary if rotary is not None else (q, q, q)
    splits = _splits(batch * heads, keys, q.device)
    per_split = -(-keys // (splits * BLOCK_S)) * BLOCK_S
    splits = -(-keys // per_split) if keys else 1
    part = ml = out
    arrived = None
    if splits > 1:
        part = torch.empty((batch * heads * splits, dim), device=q.device, dtype=torch.float32)
        ml = torch.empty((batch * heads * splits, 2), device=q.device, dtype=torch.float32)
        arrived = _ARRIVALS.get(q.device, batch * heads)
    block_d = next_power_of_2(dim)
    block_p = next_power_of_2(splits)
    _split_kernel[(batch * heads, splits)](
        q, k, v, ok if ok is not None else q, k_scales, v_scales, part, ml, out, out if arrived is None else arrived,
        cos, sin, slot, 0, heads, heads // kv_heads, keys, per_split, scale, *q_strides,
        cos.stride(0) if rotary else 0, sin.stride(0) if rotary else 0,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ok.stride(0) if ok is not None else 0, *(k_scales.stride()[:3] if fp8 else (0, 0, 0)),
        *(v_scales.stride()[:3] if fp8 else (0, 0, 0)),
        D=dim, BLOCK_D=block_d, BLOCK_S=BLOCK_S, HAS_MASK=ok is not None, DIRECT=splits == 1, FP8=fp8, NATIVE=native,
        LAST_COMBINES=arrived is not None, BLOCK_P=block_p, ROTARY=rotary is not None, num_warps=4,
        enable_fp_fusion=True, **overlap_options(q.device))
    if splits > 1 and arrived is None:
        _combine_kernel[(batch * heads,)](part, ml, out, splits, D=dim, BLOCK_D=block_d, BLOCK_P=block_p, num_warps=4,
                                          enable_fp_fusion=True)
    return out
