"""Fused dequantize + GEMV Triton kernels for decode (a few activation rows), reading the stored layouts directly.

Block formats (sym/asym int4, sym/asym int5, sym_int8, nf4/fp4) are read as int32 words: a view of the stored uint8
or int8 codes, made on the host with no copy. For 4-bit codes word c of a 32-weight block holds bytes 4c..4c+3, so
its nibble p (bits 4p..4p+3) is element (p % 2) * 16 + 4c + p // 2 of the block; an int8 word holds elements 4t..4t+3.

Codes become floats without an int-to-float conversion (a quarter-rate instruction on NVIDIA parts, which would cap a
4-bit GEMV below the memory bandwidth): the code is OR-ed into the mantissa of 1.0, which gives f = 1 + q / 2**bits
exactly, and the per-block sums are corrected afterwards. With F = sum(f * x) and X = sum(x) over the weights that
share a scale d (and min m):

    sum(q * x) = 2**bits * (F - X)
    sym  (w = (q - 2**(bits-1)) * d):  d * (2**bits * F - 1.5 * 2**bits * X)
    asym (w = q * d + m):              2**bits * d * F + (m - 2**bits * d) * X

so a weight costs one shift, one and-or and one fused multiply-add.

Subnormal codes (SUBNORMAL, sym/asym int4 and sym_int8, where the device keeps float32 subnormals) drop the shift.
A float32 bit pattern below 2**24 is worth exactly pattern * 2**-149, because the subnormals run on linearly into the
first binade. So a code masked where it lies in its word, at bit POS, reads as q * 2**(POS - 149): one AND. The
codes above bit 23 (nibbles 6 and 7, byte 3) are read from the word shifted right by 8, one shift per word. The
activation under code p is pre-scaled by 2**(149 - POS - SUBNORMAL_BIAS) once per step, so every product is
q * x * 2**-SUBNORMAL_BIAS, a normal float for every fp16 activation (bf16 and float32 ones up to 2**59), and no
1.0 is summed and taken away:

    sum(q * x) = 2**SUBNORMAL_BIAS * F

The 4-bit codebook formats (nf4, fp4) look each code up in a 16-entry float32 table instead: on CUDA one warp
shuffle a code from the lanes' registers (LANES, kernels/lane_lookup: H100 20.2 -> 16.1 us), elsewhere one load a
code from the table in memory (tl.gather, Triton's register gather, ran 4x slower than those loads on an H100).
fp4's table is e2m1, a float format itself, so with SUBNORMAL its GEMV reads the codes in place too: the three
exponent and mantissa bits moved to float32 bits 22..24 and the sign to bit 31 are worth value * 2**-126 exactly
(exponent 0 as the subnormal 2**-127), the activations are pre-scaled by 2**(126 - SUBNORMAL_BIAS), and every
product and sum is the table path's times 2**-SUBNORMAL_BIAS (bit-equal results for fp16 and bf16 activations) for
bit moves instead of a load: 43 -> 59-64% of copy on the H100, faster than shuffles (16.1 us; triton_gemv_planes
does the same for fp6). Since session 30 the moves are a shift, an arithmetic shift and a mask a weight
(triton_gemv_tiles.float_code_bits; two shifts and an and-or before: sm_90 PTX 22-29% fewer loop instructions;
H100, best tile, 14.53 / 13.85 -> 13.93 / 12.96 us on 4096x11008 / 11008x4096, session 31).
fp8 weights (e4m3fn / e5m2) have their own kernel (triton_gemv_fp8).

Every kernel accumulates in float32, handles any N (rows past the end are clamped on load, masked on store) and any
K that is a multiple of the format's block. SPLIT_K > 1 splits K across programs that add into a float32 output
with atomics (the caller zeroes it, then casts and adds the bias). No vendor intrinsics: the same source runs on
Triton's Intel XPU backend and in the Triton interpreter. (OVERLAP, set only on CUDA sm_90+, compiles in
launch_overlap's two launch-ordering instructions, and LANES, set only on CUDA, lane_lookup's shuffles; everywhere
else those lines compile to nothing.)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch_overlap import release_next, wait_previous
from .lane_lookup import lane_lookup, lane_table
from .triton_gemv_tiles import (float_code_bits, gemv_program, load_x, load_x_step, load_x_tile, place_bits,
                                row_rsqrt, split_x_tile, store_residual, store_words_result)

# Kind codes shared with triton_matmul and triton_linear (the KIND constexpr of every kernel); constexpr so that
# kernels can read them as globals. Host code uses `.value`.
Q4_SYM = tl.constexpr(0)
Q4_ASYM = tl.constexpr(1)
Q5_SYM = tl.constexpr(2)
Q5_ASYM = tl.constexpr(3)
Q8_SYM = tl.constexpr(4)
CB4 = tl.constexpr(5)
CB3 = tl.constexpr(6)  # two-plane codebooks (triton_gemv_planes): 2-bit + 1-bit planes (nf3)
CB6 = tl.constexpr(7)  # 4-bit + 2-bit planes (fp6)

ONE_BITS = 0x3F800000  # float32 1.0, passed to gemv_words_kernel as one_bits
# subnormal codes: products come out scaled by 2**-80, normal floats (full precision) for activations of magnitude
# 2**-46 to 2**59 (every fp16 value; bf16 and float32 ones past 2**59 would overflow)
SUBNORMAL_BIAS = tl.constexpr(80)


@triton.jit
def _code_term(words, high, qh, one, x, P: tl.constexpr, KIND: tl.constexpr, tab_ptr, SUBNORMAL: tl.constexpr,
               LANES: tl.constexpr):
    """f * x for code P of every word and its activations x [BW]: f from _code_floats, or with SUBNORMAL the code
    read in place as q * 2**(POS - 149) against x pre-scaled by 2**(149 - POS - SUBNORMAL_BIAS).

    high: the words >> 8 (SUBNORMAL only; for Q8_SYM the words come with their sign bits already flipped).
    """
    if SUBNORMAL and KIND == CB4:
        # fp4's e2m1 codes: exponent and mantissa bits moved to float32 bits 22..24 and the sign to bit 31 read as
        # value * 2**-126 (exponent 0 gives the subnormal 2**-127 for 0.5)
        f = float_code_bits(words, 4 * P + 3, 3, 22).to(tl.float32, bitcast=True)
        x = x * (2.0 ** (126 - SUBNORMAL_BIAS))
    elif SUBNORMAL:
        # codes above bit 23 (nibbles 6, 7; byte 3) are read from the shifted word, 8 bits lower
        if KIND == Q8_SYM:
            POS: tl.constexpr = 8 * P - 8 * (P // 3)
            MASK: tl.constexpr = 255 << POS
        else:
            POS: tl.constexpr = 4 * P - 8 * (P // 6)
            MASK: tl.constexpr = 15 << POS
        if (KIND == Q8_SYM and P == 3) or P >= 6:
            f = (high & MASK).to(tl.float32, bitcast=True)
        else:
            f = (words & MASK).to(tl.float32, bitcast=True)
        x = x * (2.0 ** (149 - POS - SUBNORMAL_BIAS))
    else:
        f = _code_floats(words, qh, one, P, KIND, tab_ptr, LANES)
    return f * x[:, None]


@triton.jit
def _code_floats(words, qh, one, P: tl.constexpr, KIND: tl.constexpr, tab_ptr, LANES: tl.constexpr):
    """Float of code P of every word: 1 + q / 2**bits for integer kinds, the table value for CB4.

    words [BW, BN] int32 (int5: merge_fifth_bits' first word, even codes; qh its second, odd codes); `one` the bits
    of 1.0 (with the sign flip of the 8-bit codes folded in for Q8_SYM).
    """
    if KIND == Q8_SYM:
        # byte P of the word, sign bit flipped (u = q + 128), placed in mantissa bits 15..22
        # (v ^ 0x400000) | 1.0 == v ^ (1.0 | 0x400000) as the bits are disjoint: one and-xor per code
        f = (place_bits(words, 8 * P, 15, 0x7F8000) ^ one).to(tl.float32, bitcast=True)
    elif KIND == CB4 and LANES:
        f = lane_lookup(tab_ptr, words >> (4 * P))
    elif KIND == CB4:
        f = tl.load(tab_ptr + ((words >> (4 * P)) & 15))
    elif (KIND == Q5_SYM) or (KIND == Q5_ASYM):
        # the whole 5-bit code from its slot of merge_fifth_bits' words into mantissa bits 18..22
        f = (place_bits(words if P % 2 == 0 else qh, 8 * (P // 2), 18, 0x7C0000) | one).to(tl.float32, bitcast=True)
    else:
        # nibble into mantissa bits 19..22
        f = (place_bits(words, 4 * P, 19, 0x780000) | one).to(tl.float32, bitcast=True)
    return f


@triton.jit
def merge_fifth_bits(words, qh):
    """A 5-bit word's eight codes whole in two words, a code to an 8-bit slot: codes 0, 2, 4, 6 in the first, 1, 3, 5,
    7 in the second (code 2j or 2j + 1 at bit 8j: its nibble, then its 5th bit). qh: the block's 5th-bit word shifted
    right by 4 * (the word's index in its block), so code p's 5th bit is its bit (p % 2) * 16 + p // 2."""
    # two words built once where the code and 5th-bit layouts meet, so Triton converts these and not every code;
    # the multiply spreads bits 0..3 to bits 4, 12, 20, 28 (no two partial products overlap, so nothing carries)
    even = (words & 0x0F0F0F0F) | (((qh & 15) * 0x02040810) & 0x10101010)
    odd = ((words >> 4) & 0x0F0F0F0F) | ((((qh >> 16) & 15) * 0x02040810) & 0x10101010)
    return even, odd


@triton.jit
def _load_words_step(w_base, s_base, mn_ptr, qh_ptr, off0, row_base, w_begin, blk_base, step, KW,
                     KIND: tl.constexpr, WPB_SHIFT: tl.constexpr, SCALE_SHIFT: tl.constexpr,
                     BLOCK_W: tl.constexpr, EVEN: tl.constexpr):
    """Words and 5th-bit words [BLOCK_W, BLOCK_N] of K step `step`, and the scales and mins of its groups of four
    words [BLOCK_W / 4, BLOCK_N] (placeholders where unused). Four aligned words always share a scale and a min."""
    off = off0 + step * BLOCK_W
    t = w_begin + step * BLOCK_W + tl.arange(0, BLOCK_W)
    tmask = t < KW
    # a group's first word, from the rows' bases (not from `off`: a reduction over `off` would cost shuffles)
    group = step * BLOCK_W + 4 * tl.arange(0, BLOCK_W // 4)
    goff = row_base + group[:, None]
    gmask = (w_begin + group < KW)[:, None]  # groups are whole: KW is a multiple of 4
    if EVEN:
        words = tl.load(w_base + off)
        d = tl.load(s_base + (goff >> (WPB_SHIFT + SCALE_SHIFT))).to(tl.float32)
    else:
        words = tl.load(w_base + off, mask=tmask[:, None], other=0)
        d = tl.load(s_base + (goff >> (WPB_SHIFT + SCALE_SHIFT)), mask=gmask, other=0.0).to(tl.float32)
    qh = words  # placeholder for kinds without 5th bits (never read)
    if KIND == Q5_SYM or KIND == Q5_ASYM:
        if EVEN:
            qh = tl.load(qh_ptr + blk_base + (off >> WPB_SHIFT))
        else:
            qh = tl.load(qh_ptr + blk_base + (off >> WPB_SHIFT), mask=tmask[:, None], other=0)
    mn = d  # placeholder for kinds without mins (never read)
    if KIND == Q4_ASYM or KIND == Q5_ASYM:
        if EVEN:
            mn = tl.load(mn_ptr + blk_base + (goff >> WPB_SHIFT)).to(tl.float32)
        else:
            mn = tl.load(mn_ptr + blk_base + (goff >> WPB_SHIFT), mask=gmask, other=0.0).to(tl.float32)
    return words, d, mn, qh


@triton.jit
def _accumulate(acc, words, high, qh, one, d, mn, xs, tab_ptr, KIND: tl.constexpr, SUBNORMAL: tl.constexpr,
                LANES: tl.constexpr,
                EPW: tl.constexpr, SCALE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc [BLOCK_W / 4, BLOCK_N] plus one activation row's products with one K step of codes; xs = load_x_step's
    (x0..x7, their sum). Corrected and scaled once per group of four words."""
    F = _code_term(words, high, qh, one, xs[0], 0, KIND, tab_ptr, SUBNORMAL, LANES)
    F += _code_term(words, high, qh, one, xs[1], 1, KIND, tab_ptr, SUBNORMAL, LANES)
    F += _code_term(words, high, qh, one, xs[2], 2, KIND, tab_ptr, SUBNORMAL, LANES)
    F += _code_term(words, high, qh, one, xs[3], 3, KIND, tab_ptr, SUBNORMAL, LANES)
    if EPW == 8:
        F += _code_term(words, high, qh, one, xs[4], 4, KIND, tab_ptr, SUBNORMAL, LANES)
        F += _code_term(words, high, qh, one, xs[5], 5, KIND, tab_ptr, SUBNORMAL, LANES)
        F += _code_term(words, high, qh, one, xs[6], 6, KIND, tab_ptr, SUBNORMAL, LANES)
        F += _code_term(words, high, qh, one, xs[7], 7, KIND, tab_ptr, SUBNORMAL, LANES)
    # sums over each group of four words (in one thread's registers), scaled once per group
    F = tl.sum(tl.reshape(F, [BLOCK_W // 4, 4, BLOCK_N]), axis=1)
    X = tl.sum(tl.reshape(xs[8], [BLOCK_W // 4, 4]), axis=1)
    if KIND == CB4 and SUBNORMAL:
        acc += ((2.0 ** SUBNORMAL_BIAS) * d) * F
    elif KIND == CB4:
        acc += d * F
    elif SUBNORMAL:
        QX: tl.constexpr = 2.0 ** SUBNORMAL_BIAS  # sum(q * x) = QX * F
        if KIND == Q4_ASYM:
            acc += (QX * d) * F + mn * X[:, None]
        else:
            acc += d * (QX * F - (0.5 * SCALE) * X[:, None])
    elif KIND == Q4_SYM or KIND == Q5_SYM or KIND == Q8_SYM:
        acc += d * (SCALE * F - (1.5 * SCALE) * X[:, None])
    else:
        acc += (SCALE * d) * F + (mn - SCALE * d) * X[:, None]
    return acc


@triton.jit(do_not_specialize=["M", "N", "steps_per_split", "one_bits"])
def gemv_words_kernel(
    x_ptr, w_ptr, s_ptr, mn_ptr, qh_ptr, tab_ptr, b_ptr, y_ptr,
    M, N, KW, stride_xm, stride_ym, steps_per_split, one_bits,
    KIND: tl.constexpr, SCALE_SHIFT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr, GATED: tl.constexpr = False,
    SUBNORMAL: tl.constexpr = False, BLOCK_M: tl.constexpr = 1, OVERLAP: tl.constexpr = False,
    TAIL: tl.constexpr = False, WHOLE: tl.constexpr = False,
    ss_ptr=None, res_ptr=None, nw_ptr=None, hw_ptr=None, ss_count=1, norm_k=1.0, eps=0.0,
    SCALE_OUT: tl.constexpr = False, RES_OUT: tl.constexpr = False, SS_BLOCK: tl.constexpr = 1,
    LANES: tl.constexpr = False, X_TILE: tl.constexpr = False,
    part_ptr=None, arrived_ptr=None, LAST_SUMS: tl.constexpr = False,
):
    """y[m, n] = sum_k x[m, k] * w[n, k] for BLOCK_M activation rows m and BLOCK_N weight rows, BLOCK_W words per K
    step.

    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K), the activation rows fastest so that programs reading the
    same weight rows run together and share them through L2. BLOCK_M (1, 2 or 4) rows decode each code once: the
    cost of a few batch rows is then their multiply-adds and activation loads, not the decoding again. Split pid_k
    covers words [pid_k, pid_k + 1) * steps_per_split * BLOCK_W. SCALE_SHIFT = log2(32-weight blocks per scale) (1
    for nf4's 64-blocks, else 0). PREFETCH = 1 issues the loads of step i + 1's weights before the arithmetic of step
    i, so two steps of weight bytes are in flight per thread; PREFETCH = 2 also loads step i + 1's activations early
    (row 0's; further rows load theirs at the start of the step); 0 loads each step when it starts.

    Tiles are [BLOCK_W words, BLOCK_N rows] (K first). A thread's 16-byte load holds four aligned words, which share
    one scale (and min): F and X are summed over each such group in registers, and the scales and mins are gathered
    once per group, [BLOCK_W / 4, BLOCK_N], from the rows' bases (sm_90, the (8, 128, 4) sym_int4 tile: 357 -> 318
    instructions and 18 -> 12 loads a step against one gather per word). 5th bits are still gathered per word.

    SUBNORMAL (Q4_SYM, Q4_ASYM, Q8_SYM, and CB4 with fp4's e2m1 table; see the module docstring) reads codes in
    place as float32 bit patterns, subnormals among them: a
    device that flushes float32 subnormals to zero must not set it (triton_operands.keeps_subnormals probes each
    device once).

    GATED: the weight is a merged [gate | up] projection of 2N rows and y gets SiLU(gate) * up [M, N]: a program
    takes BLOCK_N / 2 gate rows and their up rows (interleaved), so the activation needs no kernel of its own
    (SPLIT_K must be 1).

    OVERLAP (launch_overlap): the program reads its first step of weights, then waits for the previous kernel;
    it lets the next kernel launch once its K loop is done.

    LANES (CB4 without SUBNORMAL, i.e. nf4; CUDA only: lane_lookup): codes are looked up by warp shuffles from the
    lane's table entry, loaded once, instead of one table load a code.

    X_TILE (4-bit codes; the launcher sets it with LANES): the first row's activations of a step come from one fp16
    [BLOCK_W, 8] load (load_x_tile), not eight [BLOCK_W] loads that Triton converts to the codes' layout one by one
    through shared memory, a barrier each (sm_90 PTX, nf4's 16x64 tile: 18 -> 4 barriers a loop). It pays where the
    shuffles bound the kernel (H100, nf4 4096x11008 / 11008x4096: 16.0 / 16.0 -> 14.0 / 14.3 us, the same bits);
    sym_int4 and fp4 measured 1-7% slower with it (their loops are busier, and the tile costs registers).

    TAIL (PREFETCH = 2, BLOCK_M = 1, SPLIT_K = 1, EVEN; for K not a multiple of the step): the steps_per_split full
    steps are followed by a partial one, which the program reads first, masked, as its prefetched step 0; the loop
    then reads full steps only, unmasked (H100, 11008x4096, the best tile of each format: 1-4% faster than masking
    every step).

    WHOLE (PREFETCH > 0, steps_per_split == 1): the program's K range is one step, all of it read before the wait
    and nothing prefetched after it (the loop would re-read the step).

    Folded norms (one activation row, no K split; models/norm_fold.py): a decode step's add + RMSNorm kernels
    folded into the GEMVs around them. RES_OUT: the outputs plus the residual row at res_ptr are stored (the new
    residual h), with fp16(h * nw) at hw_ptr (nw: the next norm's weight), and each program stores its part of
    the sum of h's squares at ss_ptr[pid_n] (no atomics: a fixed order of addition, the same bits every run).
    SCALE_OUT: x is such an fp16(h * nw) row, and the outputs are multiplied by r = rsqrt(ss / norm_k + eps), ss
    the ss_count parts at ss_ptr added up: the GEMV of RMSNorm(h), sum_k W[n, k] * nw[k] * h[k] * r, with r taken
    out of the sum, so the K loop is unchanged.
    """
    tl.static_assert(BLOCK_M == 1 or BLOCK_M == 2 or BLOCK_M == 4, "BLOCK_M is 1, 2 or 4")
    EPW: tl.constexpr = 4 if KIND == Q8_SYM else 8          # codes per word
    WPB_SHIFT: tl.constexpr = 3 if KIND == Q8_SYM else 2     # log2(words per 32-weight block)
    BITS: tl.constexpr = 8 if KIND == Q8_SYM else (5 if (KIND == Q5_SYM or KIND == Q5_ASYM) else 4)
    SCALE: tl.constexpr = 1 << BITS
    pid_m, pid_n, offs_n, rows, x_row, w_begin = gemv_program(x_ptr, N, stride_xm, steps_per_split, BLOCK_N, BLOCK_W,
                                                              GATED, BLOCK_M)
    # word offsets relative to the first word of the split; rows * KW fits int32 for any weight under 2**31 words
    row_base = rows[None, :] * KW
    off0 = row_base + tl.arange(0, BLOCK_W)[:, None]
    w_base = w_ptr + w_begin
    s_base = s_ptr + (w_begin >> (WPB_SHIFT + SCALE_SHIFT))
    blk_base = w_begin >> WPB_SHIFT

    one = one_bits  # a run-time value: lets the compiler fuse the mask and the OR into one instruction
    if KIND == Q8_SYM:
        one = one_bits ^ 0x400000
    if LANES:
        tl.static_assert(KIND == CB4 and not SUBNORMAL, "LANES looks up table codes (nf4)")
        tab_ptr = lane_table(tab_ptr)
    acc = tl.zeros([BLOCK_W // 4, BLOCK_N], dtype=tl.float32)  # one entry per group of four words
    # rows past M (a partial last group) read row M - 1 and are not stored
    acc1, acc2, acc3 = acc, acc, acc
    x_row1 = x_ptr + tl.minimum(pid_m + 1, M - 1).to(tl.int64) * stride_xm
    x_row2 = x_ptr + tl.minimum(pid_m + 2, M - 1).to(tl.int64) * stride_xm
    x_row3 = x_ptr + tl.minimum(pid_m + 3, M - 1).to(tl.int64) * stride_xm
    if TAIL:
        tl.static_assert(PREFETCH == 2 and BLOCK_M == 1 and SPLIT_K == 1 and EVEN,
                         "TAIL needs PREFETCH 2, one activation row, no K split and full steps")
    if WHOLE:
        tl.static_assert(PREFETCH > 0 and not TAIL, "WHOLE reads its one step before the wait: PREFETCH > 0, no TAIL")
    TAIL_STEPS: tl.constexpr = 1 if TAIL else 0
    first = steps_per_split * TAIL_STEPS  # the partial step (after the full ones), read first
    n_words, n_d, n_mn, n_qh = _load_words_step(w_base, s_base, mn_ptr, qh_ptr, off0, row_base, w_begin, blk_base,
                                                first, KW, KIND, WPB_SHIFT, SCALE_SHIFT, BLOCK_W, EVEN and not TAIL)
    wait_previous(OVERLAP)  # the first weights are in flight; the activations are the previous kernel's output
    if X_TILE:
        tl.static_assert(EPW == 8, "X_TILE reads the activations of 4-bit codes")
        n_tile = load_x_tile(x_row, w_begin, first, KW, BLOCK_W, EVEN and not TAIL)
    else:
        n0, n1, n2, n3, n4, n5, n6, n7, nsum = load_x_step(x_row, w_begin, first, KW, BLOCK_W, EPW,
                                                           EVEN and not TAIL)
    for step in range(0, steps_per_split + TAIL_STEPS):
        if PREFETCH > 0:
            words, d, mn, qh = n_words, n_d, n_mn, n_qh
            # the last step re-reads itself (a cache hit) rather than branching; with TAIL iteration i prefetches
            # full step i (iteration 0 works on the partial step)
            ahead = tl.minimum(step + 1 - TAIL_STEPS, steps_per_split - 1)
            if not WHOLE:
                n_words, n_d, n_mn, n_qh = _load_words_step(w_base, s_base, mn_ptr, qh_ptr, off0, row_base, w_begin,
                                                            blk_base, ahead, KW, KIND, WPB_SHIFT, SCALE_SHIFT,
                                                            BLOCK_W, EVEN)
            if (PREFETCH > 1 or WHOLE) and X_TILE:  # kept as fp16 until used: fewer registers across the step
                x0, x1, x2, x3, x4, x5, x6, x7, X = split_x_tile(n_tile, BLOCK_W)
                if not WHOLE:
                    n_tile = load_x_tile(x_row, w_begin, ahead, KW, BLOCK_W, EVEN)
            elif PREFETCH > 1 or WHOLE:  # the activations of the next step too (WHOLE: this step's, read before)
                x0, x1, x2, x3, x4, x5, x6, x7, X = n0, n1, n2, n3, n4, n5, n6, n7, nsum
                if not WHOLE:
                    n0, n1, n2, n3, n4, n5, n6, n7, nsum = load_x_step(x_row, w_begin, ahead, KW, BLOCK_W, EPW,
                                                                        EVEN)
            else:
                x0, x1, x2, x3, x4, x5, x6, x7, X = load_x(x_row, w_begin, step, KW, BLOCK_W, EPW, EVEN, X_TILE)
            if BLOCK_M > 1:
                xs1 = load_x_step(x_row1, w_begin, step, KW, BLOCK_W, EPW, EVEN)
            if BLOCK_M > 2:
                xs2 = load_x_step(x_row2, w_begin, step, KW, BLOCK_W, EPW, EVEN)
                xs3 = load_x_step(x_row3, w_begin, step, KW, BLOCK_W, EPW, EVEN)
            # keeps the backend from sinking the prefetch below this step's arithmetic (it would, to reuse the
            # registers of the current step's words, and the next step would wait for memory again)
            tl.debug_barrier()
        else:
            words, d, mn, qh = _load_words_step(w_base, s_base, mn_ptr, qh_ptr, off0, row_base, w_begin, blk_base,
                                                step, KW, KIND, WPB_SHIFT, SCALE_SHIFT, BLOCK_W, EVEN)
            x0, x1, x2, x3, x4, x5, x6, x7, X = load_x(x_row, w_begin, step, KW, BLOCK_W, EPW, EVEN, X_TILE)
            if BLOCK_M > 1:
                xs1 = load_x_step(x_row1, w_begin, step, KW, BLOCK_W, EPW, EVEN)
            if BLOCK_M > 2:
                xs2 = load_x_step(x_row2, w_begin, step, KW, BLOCK_W, EPW, EVEN)
                xs3 = load_x_step(x_row3, w_begin, step, KW, BLOCK_W, EPW, EVEN)
        if KIND == Q5_SYM or KIND == Q5_ASYM:
            t = w_begin + step * BLOCK_W + tl.arange(0, BLOCK_W)
            words, qh = merge_fifth_bits(words, qh >> ((t & 3) * 4)[:, None])
        high = words
        if SUBNORMAL and KIND != CB4:
            if KIND == Q8_SYM:
                words = words ^ -0x7F7F7F80  # 0x80808080: every byte's sign flipped, u = q + 128
            high = words >> 8
        acc = _accumulate(acc, words, high, qh, one, d, mn, (x0, x1, x2, x3, x4, x5, x6, x7, X), tab_ptr, KIND,
                          SUBNORMAL, LANES, EPW, SCALE, BLOCK_W, BLOCK_N)
        # further activation rows reuse the decoded codes (the same expressions, computed once)
        if BLOCK_M > 1:
            acc1 = _accumulate(acc1, words, high, qh, one, d, mn, xs1, tab_ptr, KIND, SUBNORMAL, LANES, EPW, SCALE,
                               BLOCK_W, BLOCK_N)
        if BLOCK_M > 2:
            acc2 = _accumulate(acc2, words, high, qh, one, d, mn, xs2, tab_ptr, KIND, SUBNORMAL, LANES, EPW, SCALE,
                               BLOCK_W, BLOCK_N)
            acc3 = _accumulate(acc3, words, high, qh, one, d, mn, xs3, tab_ptr, KIND, SUBNORMAL, LANES, EPW, SCALE,
                               BLOCK_W, BLOCK_N)

    release_next(OVERLAP)  # the next kernel's programs take the SMs this one's tail leaves idle
    if SCALE_OUT or RES_OUT:
        tl.static_assert(BLOCK_M == 1 and SPLIT_K == 1, "the folded norm modes take one row and no K split")
    if SCALE_OUT:
        acc = acc * row_rsqrt(ss_ptr, ss_count, norm_k, eps, SS_BLOCK)
    if RES_OUT:
        store_residual(acc, b_ptr, y_ptr, res_ptr, nw_ptr, hw_ptr, ss_ptr, pid_n, offs_n, rows, N, HAS_BIAS)
    else:
        store_words_result(acc, b_ptr, y_ptr, pid_m, pid_n, offs_n, rows, N, stride_ym, SPLIT_K, HAS_BIAS, BLOCK_N,
                           GATED, True, M, part_ptr, arrived_ptr, LAST_SUMS)
    if BLOCK_M > 1:
        store_words_result(acc1, b_ptr, y_ptr, pid_m + 1, pid_n, offs_n, rows, N, stride_ym, SPLIT_K, HAS_BIAS,
                           BLOCK_N, GATED, pid_m + 1 < M, M, part_ptr, arrived_ptr, LAST_SUMS)
    if BLOCK_M > 2:
        store_words_result(acc2, b_ptr, y_ptr, pid_m + 2, pid_n, offs_n, rows, N, stride_ym, SPLIT_K, HAS_BIAS,
                           BLOCK_N, GATED, pid_m + 2 < M, M, part_ptr, arrived_ptr, LAST_SUMS)
        store_words_result(acc3, b_ptr, y_ptr, pid_m + 3, pid_n, offs_n, rows, N, stride_ym, SPLIT_K, HAS_BIAS,
                           BLOCK_N, GATED, pid_m + 3 < M, M, part_ptr, arrived_ptr, LAST_SUMS)
