"""What every decode GEMV kernel shares around its K loop: which rows a program serves, how a step's activations are
read, the bit moves its decoders use, and the epilogues that write its output (one row, split-K atomics, or the
gated SiLU(gate) * up), with the folded-norm ones (triton_folded_norm: residual add and partial sums of squares;
1/RMS from those sums). triton_gemv, triton_gemv_planes and triton_gemv_fp8 build on these."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def place_bits(v, SRC: tl.constexpr, DST: tl.constexpr, MASK: tl.constexpr):
    """v's bits moved from bit SRC up or down to bit DST, then masked with MASK (given at DST)."""
    if SRC >= DST:
        out = (v >> (SRC - DST)) & MASK
    else:
        out = (v << (DST - SRC)) & MASK
    return out


@triton.jit
def float_code_bits(v, SIGN: tl.constexpr, WIDTH: tl.constexpr, DST: tl.constexpr):
    """A float code of v as float32 bits: its sign (v's bit SIGN) to bit 31 and the WIDTH bits under it to DST and up,
    the rest zero. The code goes up until its sign is bit 31 and an arithmetic shift brings the rest down while the
    sign stays, so one mask keeps both: three instructions, where moving sign and field apart took four."""
    MASK: tl.constexpr = -(1 << 31) | (((1 << WIDTH) - 1) << DST)
    return ((v << (31 - SIGN)) >> (31 - WIDTH - DST)) & MASK


@triton.jit
def gemv_program(x_ptr, N, stride_xm, steps_per_split, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                 GATED: tl.constexpr, BLOCK_M: tl.constexpr = 1):
    """This GEMV program's (first activation row, pid_n, output columns, weight rows clamped in range, first
    activation row's pointer, first word of its K split). GATED programs take BLOCK_N / 2 gate rows and their up
    rows (N further down), interleaved. A program serves activation rows [pid_m, pid_m + 1) * BLOCK_M."""
    pid_m = tl.program_id(0) * BLOCK_M
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if GATED:
        j = tl.arange(0, BLOCK_N)
        offs_n = pid_n * (BLOCK_N // 2) + j // 2
        rows = tl.minimum(offs_n, N - 1) + (j % 2) * N  # gate rows at even j, their up rows at odd j
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(offs_n, N - 1)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    return pid_m, pid_n, offs_n, rows, x_row, pid_k * steps_per_split * BLOCK_W


@triton.jit
def load_x_step(x_row, w_begin, step, KW, BLOCK_W: tl.constexpr, EPW: tl.constexpr, EVEN: tl.constexpr):
    """The activations under code p of every word of step `step` (x0..x7, float32 [BLOCK_W]; for 8-bit codes
    x4..x7 repeat x0..x3) and their sum over p."""
    t = w_begin + step * BLOCK_W + tl.arange(0, BLOCK_W)
    tmask = t < KW
    if EPW == 8:
        kbase = x_row + (t >> 2) * 32 + (t & 3) * 4
        offs0, offs1, offs2, offs3 = 0, 16, 1, 17
    else:
        kbase = x_row + t * 4
        offs0, offs1, offs2, offs3 = 0, 1, 2, 3
    if EVEN:
        x0 = tl.load(kbase + offs0).to(tl.float32)
        x1 = tl.load(kbase + offs1).to(tl.float32)
        x2 = tl.load(kbase + offs2).to(tl.float32)
        x3 = tl.load(kbase + offs3).to(tl.float32)
    else:
        x0 = tl.load(kbase + offs0, mask=tmask, other=0.0).to(tl.float32)
        x1 = tl.load(kbase + offs1, mask=tmask, other=0.0).to(tl.float32)
        x2 = tl.load(kbase + offs2, mask=tmask, other=0.0).to(tl.float32)
        x3 = tl.load(kbase + offs3, mask=tmask, other=0.0).to(tl.float32)
    if EPW == 8:
        if EVEN:
            x4 = tl.load(kbase + 2).to(tl.float32)
            x5 = tl.load(kbase + 18).to(tl.float32)
            x6 = tl.load(kbase + 3).to(tl.float32)
            x7 = tl.load(kbase + 19).to(tl.float32)
        else:
            x4 = tl.load(kbase + 2, mask=tmask, other=0.0).to(tl.float32)
            x5 = tl.load(kbase + 18, mask=tmask, other=0.0).to(tl.float32)
            x6 = tl.load(kbase + 3, mask=tmask, other=0.0).to(tl.float32)
            x7 = tl.load(kbase + 19, mask=tmask, other=0.0).to(tl.float32)
        xsum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    else:
        x4, x5, x6, x7 = x0, x1, x2, x3
        xsum = (x0 + x1) + (x2 + x3)
    return x0, x1, x2, x3, x4, x5, x6, x7, xsum


@triton.jit
def load_x_tile(x_row, w_begin, step, KW, BLOCK_W: tl.constexpr, EVEN: tl.constexpr, COLS: tl.constexpr = 8):
    """A step's activations as one fp16 [BLOCK_W, COLS] tile, a word's in memory order: COLS 8, load_x_step's for
    4-bit codes (four words a 32-weight block, a word's eight activations two runs of four, 16 apart: column
    (p % 2) * 4 + p // 2 holds code p's; split_x_tile splits it); COLS 16, nf3's low-plane words (two a block, four
    runs of four, 8 apart: column (f % 4) * 4 + f // 4 holds field f's; split_x_tile16)."""
    LOG_WORDS: tl.constexpr = 2 if COLS == 8 else 1  # log2(words a 32-weight block)
    t = w_begin + step * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.arange(0, COLS)
    base = (t >> LOG_WORDS) * 32 + (t & ((1 << LOG_WORDS) - 1)) * 4
    offs = base[:, None] + ((c & 3) + (c >> 2) * (128 // COLS))[None, :]
    if EVEN:
        return tl.load(x_row + offs)
    return tl.load(x_row + offs, mask=(t < KW)[:, None], other=0.0)


@triton.jit
def split_x_tile(tile, BLOCK_W: tl.constexpr):
    """load_x_tile's tile as load_x_step returns its activations: x0..x7 float32 [BLOCK_W] and their sum (added in
    load_x_step's order, so both give the same bits)."""
    # column bits: p % 2, p // 4, (p // 2) % 2; tl.split takes the last dimension first
    p_bit1_clear, p_bit1_set = tl.split(tl.reshape(tile.to(tl.float32), [BLOCK_W, 2, 2, 2]))
    codes01, codes45 = tl.split(p_bit1_clear)
    codes23, codes67 = tl.split(p_bit1_set)
    x0, x1 = tl.split(codes01)
    x2, x3 = tl.split(codes23)
    x4, x5 = tl.split(codes45)
    x6, x7 = tl.split(codes67)
    return x0, x1, x2, x3, x4, x5, x6, x7, ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))


@triton.jit
def _four_runs(part):
    """The four [BLOCK_W] vectors of a [BLOCK_W, 2, 2] part of split_x_tile16's tile, by run (f % 4)."""
    bit0_clear, bit0_set = tl.split(part)
    run0, run2 = tl.split(bit0_clear)
    run1, run3 = tl.split(bit0_set)
    return run0, run1, run2, run3


@triton.jit
def split_x_tile16(tile, BLOCK_W: tl.constexpr):
    """load_x_tile(..., COLS=16)'s tile as float32 [BLOCK_W] vectors, fields 0..15 in order (a 16-tuple)."""
    # column bits: f % 4 (two), f // 4 (two); tl.split takes the last dimension first
    pos_even, pos_odd = tl.split(tl.reshape(tile.to(tl.float32), [BLOCK_W, 2, 2, 2, 2]))
    pos0, pos2 = tl.split(pos_even)
    pos1, pos3 = tl.split(pos_odd)
    x0, x1, x2, x3 = _four_runs(pos0)
    x4, x5, x6, x7 = _four_runs(pos1)
    x8, x9, x10, x11 = _four_runs(pos2)
    x12, x13, x14, x15 = _four_runs(pos3)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@triton.jit
def load_x(x_row, w_begin, step, KW, BLOCK_W: tl.constexpr, EPW: tl.constexpr, EVEN: tl.constexpr,
           X_TILE: tl.constexpr):
    """load_x_step's result, read as one tile (load_x_tile) where X_TILE."""
    if X_TILE:
        return split_x_tile(load_x_tile(x_row, w_begin, step, KW, BLOCK_W, EVEN), BLOCK_W)
    return load_x_step(x_row, w_begin, step, KW, BLOCK_W, EPW, EVEN)


@triton.jit
def store_row(y, b_ptr, y_ptr, pid_m, offs_n, rows, N, stride_ym, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
              row_ok=True, M=1, part_ptr=None, arrived_ptr=None, LAST_SUMS: tl.constexpr = False):
    """Write output row pid_m (if row_ok), bias added once. Split K: with LAST_SUMS each split stores its float32
    partial in part [SPLIT_K, M, N] and the row's last split to arrive (counters at arrived_ptr, one per row and
    program column) sums them in split order and writes y; else the splits add into a zeroed float32 y atomically."""
    # a select, not `& row_ok`: Triton's interpreter turns a vector AND a scalar flag into an int32 mask it rejects
    nmask = tl.where(row_ok, offs_n < N, False)
    y_ptrs = y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + rows).to(tl.float32)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=nmask)
    elif LAST_SUMS:
        plane = M.to(tl.int64) * N
        p_ptrs = part_ptr + pid_m.to(tl.int64) * N + offs_n
        tl.store(p_ptrs + tl.program_id(2) * plane, y, mask=nmask)
        # every thread's stores come before the arrival (the barrier), and the release makes them visible to the
        # split that arrives last (as triton_matmul's split tiles do)
        tl.debug_barrier()
        if row_ok:
            counter = arrived_ptr + pid_m * tl.num_programs(1) + tl.program_id(1)
            before = tl.atomic_add(counter, 1, sem="acq_rel")
            if before == SPLIT_K - 1:
                total = tl.load(p_ptrs, mask=nmask, other=0.0)
                for k in tl.static_range(1, SPLIT_K):  # a fixed order: the sum does not depend on arrival order
                    total += tl.load(p_ptrs + k * plane, mask=nmask, other=0.0)
                if HAS_BIAS:
                    total += tl.load(b_ptr + rows).to(tl.float32)
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=nmask)
                tl.atomic_xchg(counter, 0, sem="relaxed")  # zero again; kernel boundaries order it
    else:
        tl.atomic_add(y_ptrs, y, mask=nmask, sem="relaxed")


@triton.jit
def store_gated(y, b_ptr, y_ptr, pid_m, pid_n, rows, N, stride_ym, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                row_ok=True):
    """Write SiLU(gate) * up of the (gate, up) row pairs interleaved in y, rounded where a GEMV storing [gate | up]
    and then triton_silu_mul would round (the sums, SiLU, the product), so the fused result is bit-identical."""
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    out_ty = y_ptr.dtype.element_ty
    gate, up = tl.split(tl.reshape(y.to(out_ty), [BLOCK_N // 2, 2]))
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ty)
    out = (silu.to(tl.float32) * up.to(tl.float32)).to(out_ty)
    offs = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + offs, out, mask=tl.where(row_ok, offs < N, False))


@triton.jit
def store_words_result(acc, b_ptr, y_ptr, pid_m, pid_n, offs_n, rows, N, stride_ym, SPLIT_K: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr, row_ok=True, M=1,
                       part_ptr=None, arrived_ptr=None, LAST_SUMS: tl.constexpr = False):
    """Reduce a [words, rows] accumulator over K and write it (if row_ok): SiLU(gate) * up when GATED, else one
    output row (store_row: M, part_ptr, arrived_ptr and LAST_SUMS are its split-K arguments)."""
    y = tl.sum(acc, axis=0)
    if GATED:
        tl.static_assert(SPLIT_K == 1, "a gated GEMV takes no K split")
        store_gated(y, b_ptr, y_ptr, pid_m, pid_n, rows, N, stride_ym, HAS_BIAS, BLOCK_N, row_ok)
    else:
        store_row(y, b_ptr, y_ptr, pid_m, offs_n, rows, N, stride_ym, SPLIT_K, HAS_BIAS, row_ok, M, part_ptr,
                  arrived_ptr, LAST_SUMS)


@triton.jit
def store_residual(acc, b_ptr, h_ptr, res_ptr, nw_ptr, hw_ptr, ss_ptr, pid_n, offs_n, rows, N,
                   HAS_BIAS: tl.constexpr):
    """RES_OUT's epilogue: h = residual + the outputs (rounded as the GEMV and then the add would round), stored with
    fp16(h * nw), and the program's sum of h's squares stored at ss_ptr[pid_n]."""
    nmask = offs_n < N
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    out_ty = h_ptr.dtype.element_ty
    h = (y.to(out_ty).to(tl.float32) + tl.load(res_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)).to(out_ty)
    tl.store(h_ptr + offs_n, h, mask=nmask)
    hf = tl.where(nmask, h.to(tl.float32), 0.0)
    tl.store(hw_ptr + offs_n, (hf * tl.load(nw_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)).to(out_ty),
             mask=nmask)
    tl.store(ss_ptr + pid_n, tl.sum(hf * hf, axis=0))


@triton.jit
def row_rsqrt(ss_ptr, ss_count, norm_k, eps, SS_BLOCK: tl.constexpr):
    """1 / RMS of a row from the ss_count partial sums of squares a RES_OUT GEMV stored, added in a fixed order."""
    offs = tl.arange(0, SS_BLOCK)
    return tl.math.rsqrt(tl.sum(tl.load(ss_ptr + offs, mask=offs < ss_count, other=0.0), axis=0) / norm_k + eps)
