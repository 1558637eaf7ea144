"""Dequantize-in-tile matmul (prefill and batched decode) and a standalone dequantize kernel, in Triton.

`block_values` turns BLOCK_N rows x NB 32-weight blocks of any block format into two float32 [BLOCK_N, NB, 16]
tensors: the first and second half of every block. For the 4/5-bit layouts those are exactly the low and high
nibbles of the block's 16 bytes, so no interleaving is needed: the matmul multiplies each half by the matching
16-column slices of x (two tl.dot per K step, each with K = NB * 16), and the dequantize kernel stores each half
where it belongs. fp8 weights have their own matmul: the codes convert exactly to the activation dtype and the
per-channel scale multiplies the finished dot product.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch_overlap import release_next, wait_previous
from .triton_gemv import CB3, CB4, CB6, Q4_ASYM, Q4_SYM, Q5_ASYM, Q5_SYM, Q8_SYM
from .triton_gemv_fp8 import fp8_bytes_to_float
from .triton_gemv_planes import join_planes


@triton.jit
def _plane_codes(w_ptr, qh_ptr, r, b, j, m3, KB, KIND: tl.constexpr, EVEN: tl.constexpr):
    """Codes of elements j and j + 16 of blocks b of a two-plane codebook (low plane bytes at w_ptr, high plane as
    int32 words at qh_ptr), [BN, NB, 16] each.

    A plane of `bits` holds a 32-run's element e in byte e % (4 * bits) at bit bits * (e // (4 * bits)) (see
    formats/codebooks.py), so both elements' bits come from one byte of each plane."""
    BL: tl.constexpr = 2 if KIND == CB3 else 4
    BH: tl.constexpr = 1 if KIND == CB3 else 2
    lo_ptrs = w_ptr + r * (KB * 4 * BL) + b * (4 * BL) + j % (4 * BL)
    hb = j % (4 * BH)  # the high byte's index in the run, then its word and that byte's bit offset
    hi_ptrs = qh_ptr + r * (KB * BH) + b * BH + hb // 4
    if EVEN:
        lb = tl.load(lo_ptrs).to(tl.int32)
        hw = tl.load(hi_ptrs)
    else:
        lb = tl.load(lo_ptrs, mask=m3, other=0).to(tl.int32)
        hw = tl.load(hi_ptrs, mask=m3, other=0)
    hw = hw >> ((hb % 4) * 8)
    c0 = join_planes(lb, hw, BL * (j // (4 * BL)), BH * (j // (4 * BH)), BL, BH)
    c1 = join_planes(lb, hw, BL * ((j + 16) // (4 * BL)), BH * ((j + 16) // (4 * BH)), BL, BH)
    return c0, c1


@triton.jit
def _table_values(tab_ptr, codes, KIND: tl.constexpr):
    """The codebook values of codes [BN, NB, 16].

    Tables of up to 16 entries are gathered from registers (warp shuffles): as loads, the pipelined matmul loop would
    turn each lookup into an asynchronous copy of one element through shared memory. fp6's 64 entries would take 8
    shuffles a lookup, so it loads, and its tiles run unpipelined (triton_linear)."""
    if KIND == CB6:
        return tl.load(tab_ptr + codes)
    T: tl.constexpr = 8 if KIND == CB3 else 16
    table = tl.load(tab_ptr + tl.arange(0, T))
    return tl.gather(tl.broadcast_to(table[None, None, :], [codes.shape[0], codes.shape[1], T]), codes, 2)


@triton.jit
def exact_float(q, OFFSET: tl.constexpr):
    """float32(q - OFFSET) for int32 codes 0 <= q < 2**22, exactly, without an int-to-float conversion (a
    quarter-rate instruction on NVIDIA parts): q OR-ed into the mantissa of 2**23, then one exact subtraction."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def block_values(w_ptr, s_ptr, mn_ptr, qh_ptr, tab_ptr, rows, blk, bmask, KB,
                 KIND: tl.constexpr, SBLK_SHIFT: tl.constexpr, EVEN: tl.constexpr):
    """Dequantized weights of blocks `blk` [NB] of `rows` [BN] (int64): (first halves, second halves), [BN, NB, 16].

    KB is the number of 32-weight blocks per row; a scale covers 2**SBLK_SHIFT blocks. Out-of-range blocks (bmask
    false, only when not EVEN) come out as exact zeros.
    """
    j = tl.arange(0, 16)[None, None, :]
    r = rows[:, None, None]
    b = blk[None, :, None]
    m3 = bmask[None, :, None]
    if KIND == Q8_SYM:
        ptrs = w_ptr + r * (KB * 32) + b * 32 + j
        if EVEN:
            lo = tl.load(ptrs).to(tl.float32)
            hi = tl.load(ptrs + 16).to(tl.float32)
        else:
            lo = tl.load(ptrs, mask=m3, other=0).to(tl.float32)
            hi = tl.load(ptrs + 16, mask=m3, other=0).to(tl.float32)
    elif KIND == CB3 or KIND == CB6:
        qlo, qhi = _plane_codes(w_ptr, qh_ptr, r, b, j, m3, KB, KIND, EVEN)
        lo = _table_values(tab_ptr, qlo, KIND)
        hi = _table_values(tab_ptr, qhi, KIND)
    else:
        ptrs = w_ptr + r * (KB * 16) + b * 16 + j
        if EVEN:
            byte = tl.load(ptrs).to(tl.int32)
        else:
            byte = tl.load(ptrs, mask=m3, other=0).to(tl.int32)
        qlo = byte & 15
        qhi = byte >> 4
        if KIND == Q5_SYM or KIND == Q5_ASYM:
            if EVEN:
                qh = tl.load(qh_ptr + r * KB + b)
            else:
                qh = tl.load(qh_ptr + r * KB + b, mask=m3, other=0)
            qlo = qlo | (((qh >> j) & 1) << 4)
            qhi = qhi | (((qh >> (j + 16)) & 1) << 4)
        if KIND == CB4:
            lo = _table_values(tab_ptr, qlo, KIND)
            hi = _table_values(tab_ptr, qhi, KIND)
        elif KIND == Q4_SYM or KIND == Q5_SYM:
            # the offset (q - 2**(bits-1)) folds into the conversion's subtraction; for the asym kinds and int8 the
            # extra add measured level or slower than the conversion (H100, session 12)
            OFFSET: tl.constexpr = 8.0 if KIND == Q4_SYM else 16.0
            lo = exact_float(qlo, OFFSET)
            hi = exact_float(qhi, OFFSET)
        else:
            lo = qlo.to(tl.float32)
            hi = qhi.to(tl.float32)
    s_ptrs = s_ptr + r * ((KB + (1 << SBLK_SHIFT) - 1) >> SBLK_SHIFT) + (b >> SBLK_SHIFT)
    if EVEN:
        d = tl.load(s_ptrs).to(tl.float32)
    else:
        d = tl.load(s_ptrs, mask=m3, other=0.0).to(tl.float32)
    if KIND == Q4_ASYM or KIND == Q5_ASYM:
        mn_ptrs = mn_ptr + r * KB + b
        if EVEN:
            mn = tl.load(mn_ptrs).to(tl.float32)
        else:
            mn = tl.load(mn_ptrs, mask=m3, other=0.0).to(tl.float32)
        lo = lo * d + mn
        hi = hi * d + mn
    else:
        lo = lo * d
        hi = hi * d
    return lo, hi


@triton.jit
def _tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(offs_m, offs_n, xm, rows) of program pid's output tile, xm and rows clamped in range, as int64.

    Tiles go in grouped order: GROUP_M row tiles share each weight tile in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    xm = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    return offs_m, offs_n, xm, rows


@triton.jit
def _zero_tile(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """The float32 accumulator of an output tile, [BLOCK_M, BLOCK_N], or transposed with SWAP."""
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return acc


@triton.jit
def _tile_dot(x, w, acc, SWAP: tl.constexpr):
    """acc + x @ w.T, or with SWAP the transposed acc + w @ x.T: the decoded weights become the dot's first
    operand, which sm_90 runs as wgmma from a 64-row weight tile where a 16-row activation tile takes mma.sync."""
    if SWAP:
        out = tl.dot(w, tl.trans(x), acc)
    else:
        out = tl.dot(x, tl.trans(w), acc)
    return out


@triton.jit
def _unswap(acc, SWAP: tl.constexpr):
    """The accumulator as [BLOCK_M, BLOCK_N]."""
    if SWAP:
        acc = tl.trans(acc)
    return acc


@triton.jit(do_not_specialize=["M", "N", "steps_per_split"])
def matmul_blocks_kernel(
    x_ptr, w_ptr, s_ptr, mn_ptr, qh_ptr, tab_ptr, b_ptr, y_ptr, part_ptr, arrived_ptr,
    M, N, KB, stride_xm, stride_ym, steps_per_split,
    KIND: tl.constexpr, SBLK_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, SWAP: tl.constexpr = False,
    OVERLAP: tl.constexpr = False, LAST_SUMS: tl.constexpr = False,
):
    """y = x @ dequant(w).T (+ bias) for a block format; grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K).

    Split pid_k covers 32-weight blocks [pid_k, pid_k + 1) * steps_per_split * NB. SWAP computes the transposed
    tile, dequant(w) @ x.T, so that the decoded weights are the dot's first operand (few activation rows)."""
    release_next(OVERLAP)
    wait_previous(OVERLAP)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m, offs_n, xm, rows = _tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    u = tl.arange(0, NB * 16)
    xcol = (u // 16) * 32 + (u % 16)           # column of x under element u of a first-half slice
    x_rows = x_ptr + xm[:, None] * stride_xm
    dot_ty = x_ptr.dtype.element_ty

    b_begin = pid_k * steps_per_split * NB
    acc = _zero_tile(BLOCK_M, BLOCK_N, SWAP)
    for step in range(0, steps_per_split):
        kb0 = b_begin + step * NB
        blk = kb0 + tl.arange(0, NB)
        bmask = blk < KB
        lo, hi = block_values(w_ptr, s_ptr, mn_ptr, qh_ptr, tab_ptr, rows, blk, bmask, KB, KIND, SBLK_SHIFT, EVEN)
        w_lo = tl.reshape(lo, [BLOCK_N, NB * 16]).to(dot_ty)
        w_hi = tl.reshape(hi, [BLOCK_N, NB * 16]).to(dot_ty)
        x_ptrs = x_rows + kb0 * 32 + xcol[None, :]
        if EVEN:
            x_lo = tl.load(x_ptrs)
            x_hi = tl.load(x_ptrs + 16)
        else:
            umask = (kb0 + u // 16) < KB
            x_lo = tl.load(x_ptrs, mask=umask[None, :], other=0.0)
            x_hi = tl.load(x_ptrs + 16, mask=umask[None, :], other=0.0)
        acc = _tile_dot(x_lo, w_lo, acc, SWAP)
        acc = _tile_dot(x_hi, w_hi, acc, SWAP)
    _store_tile(_unswap(acc, SWAP), b_ptr, y_ptr, part_ptr, arrived_ptr, offs_m, offs_n, rows, M, N, stride_ym,
                SPLIT_K, HAS_BIAS, LAST_SUMS)


@triton.jit
def _store_tile(acc, b_ptr, y_ptr, part_ptr, arrived_ptr, offs_m, offs_n, rows, M, N, stride_ym,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, LAST_SUMS: tl.constexpr):
    """Write a finished tile: whole (SPLIT_K 1); with LAST_SUMS, as K split pid_k's partial into part [SPLIT_K, M,
    N] float32, the tile's last split to arrive summing them in split order and writing y; else added into a zeroed
    float32 y by atomics."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    elif LAST_SUMS:
        tile = tl.program_id(0)
        plane = M.to(tl.int64) * N
        p_ptrs = part_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(p_ptrs + tl.program_id(1) * plane, acc, mask=mask)
        # every thread's stores come before the arrival (the barrier); the release makes them visible to the split
        # that arrives last, whose acquire orders its reads after all of them
        tl.debug_barrier()
        before = tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel")
        if before == SPLIT_K - 1:
            total = tl.load(p_ptrs, mask=mask, other=0.0)
            for k in tl.static_range(1, SPLIT_K):  # a fixed order: the sum does not depend on arrival order
                total += tl.load(p_ptrs + k * plane, mask=mask, other=0.0)
            if HAS_BIAS:
                total += tl.load(b_ptr + rows).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(arrived_ptr + tile, 0, sem="relaxed")  # zero again; kernel boundaries order it
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["M", "N", "steps_per_split"])
def matmul_fp8_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, arrived_ptr,
    M, N, K, stride_xm, stride_ym, steps_per_split,
    E5M2: tl.constexpr, NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, SWAP: tl.constexpr = False,
    OVERLAP: tl.constexpr = False, LAST_SUMS: tl.constexpr = False,
):
    """y = (x @ w.T) * scale[n] (+ bias) for fp8 weights [N, K] with a float32 scale per row (SWAP: _tile_dot)."""
    release_next(OVERLAP)
    wait_previous(OVERLAP)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m, offs_n, xm, rows = _tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + xm[:, None] * stride_xm
    w_rows = w_ptr + rows[:, None] * K
    dot_ty = x_ptr.dtype.element_ty
    k_begin = pid_k * steps_per_split * BLOCK_K
    acc = _zero_tile(BLOCK_M, BLOCK_N, SWAP)
    for step in range(0, steps_per_split):
        k = k_begin + step * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN:
            q = tl.load(w_rows + k[None, :])
            xt = tl.load(x_rows + k[None, :])
        else:
            kmask = k < K
            q = tl.load(w_rows + k[None, :], mask=kmask[None, :])
            xt = tl.load(x_rows + k[None, :], mask=kmask[None, :], other=0.0)
        w = fp8_bytes_to_float(q, E5M2, NATIVE, dot_ty)
        if not EVEN:
            w = tl.where(kmask[None, :], w, 0.0)  # masked lanes hold garbage (possibly NaN codes)
        acc = _tile_dot(xt, w, acc, SWAP)
    scale = tl.load(s_ptr + rows)
    if not NATIVE and not E5M2:
        scale = scale * 256.0
    acc = _unswap(acc, SWAP) * scale[None, :]
    _store_tile(acc, b_ptr, y_ptr, part_ptr, arrived_ptr, offs_m, offs_n, rows, M, N, stride_ym, SPLIT_K, HAS_BIAS,
                LAST_SUMS)


@triton.jit(do_not_specialize=["N"])
def dequant_blocks_kernel(
    w_ptr, s_ptr, mn_ptr, qh_ptr, tab_ptr, out_ptr, N, KB,
    KIND: tl.constexpr, SBLK_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, EVEN: tl.constexpr,
):
    """out[N, KB * 32] = the dequantized weight in out's dtype; grid (cdiv(N, BLOCK_N), cdiv(KB, NB))."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)
    bmask = blk < KB
    lo, hi = block_values(w_ptr, s_ptr, mn_ptr, qh_ptr, tab_ptr, rows, blk, bmask, KB, KIND, SBLK_SHIFT, EVEN)
    j = tl.arange(0, 16)[None, None, :]
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None, None] * (KB * 32) + blk[None, :, None] * 32 + j
    mask = (offs_n[:, None, None] < N) & bmask[None, :, None]
    ty = out_ptr.dtype.element_ty
    tl.store(ptrs, lo.to(ty), mask=mask)
    tl.store(ptrs + 16, hi.to(ty), mask=mask)


@triton.jit(do_not_specialize=["N"])
def dequant_fp8_kernel(w_ptr, s_ptr, out_ptr, N, K, E5M2: tl.constexpr, NATIVE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[N, K] = float8 weight * row scale in out's dtype (one rounding of the float32 product)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    mask = (offs_n[:, None] < N) & (k[None, :] < K)
    q = tl.load(w_ptr + rows[:, None] * K + k[None, :], mask=mask)
    w = fp8_bytes_to_float(q, E5M2, NATIVE, tl.float32)
    if not NATIVE and not E5M2:
        w = w * 256.0
    w = w * tl.load(s_ptr + rows)[:, None]
    tl.store(out_ptr + rows[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)
