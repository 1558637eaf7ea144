"""Fused dequantize + GEMV for the two-plane codebook formats (nf3: 2-bit + 1-bit planes, fp6: 4-bit + 2-bit).

The formats (formats/codebooks.py) store a code's low bits in one plane and its high bits in another, each packed
in runs of 32 inputs. Word t of the low plane (BL bits a code, so 32 / BL codes a word and BL words a run) holds, in
field f (bits f*BL ..), the code of element

    32 * run + 4 * c + f // P + (32 / P) * (f % P),     run = t // BL, c = t % BL, P = 8 // BL codes per byte.

The high plane (BH bits a code, BH words a run) holds the same element's high bits in its word run * BH + c % BH,
at bit f * BL once that word is shifted right by BH * (c // BH). A K step reads its high words once a run
(contiguous loads) and spreads each to its run's low words; merge_planes then joins the two planes once a word into
two words holding every code whole, a code to a 2 * BL-bit slot, so a code costs one shift before its lookup.
Joining them once a word, not once a code, matters on the GPU: the two planes' loads get different register layouts,
and Triton converted every code's bits between them through shared memory (H100, nf3 4096x11008 23.2 -> 21.0 us,
11008x4096 25.5 -> 22.4; fp6 23.0 -> 22.6 and 26.5 -> 25.7 in place, with scales applied once per group of four
words).
nf3 looks its codes up two at a time from a 64-entry table of value pairs indexed by both 3-bit codes
(triton_operands.pair_table, 512 bytes of int64), half the loads; on CUDA (LANES, kernels/lane_lookup) one at a time
by warp shuffles from an 8-entry lane table instead, as nf4's are.
fp6's table is e3m2 (bias 3), itself a float format: with SUBNORMAL (set where the device keeps float32 subnormals,
as for triton_gemv's in-place codes) its codes are read in place instead, their five exponent and mantissa bits at
float32 bits 21..25 and the sign at bit 31 worth value * 2**-124, against activations pre-scaled by
2**(124 - SUBNORMAL_BIAS): the table path's products times 2**-SUBNORMAL_BIAS, so the same bits without the load
(three instructions a code: triton_gemv_tiles.float_code_bits).
Tests check these positions against the formats' own unpacking (tests/gpu/test_triton_linear.py).

Same tiles and grid as triton_gemv.gemv_words_kernel, and the same launch arguments (mn_ptr and one_bits unused;
qh_ptr is the high plane as int32 words), so the launcher and autotuning serve both kernels.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .lane_lookup import lane_lookup, lane_table
from .triton_gemv import CB3, SUBNORMAL_BIAS
from .triton_gemv_tiles import (float_code_bits, gemv_program, load_x_tile, place_bits, split_x_tile,
                                split_x_tile16, store_words_result)


@triton.jit
def join_planes(low, high, low_shift, high_shift, BL: tl.constexpr, BH: tl.constexpr):
    """The code whose BL low bits sit at low_shift in `low` and BH high bits at high_shift in `high`."""
    return ((low >> low_shift) & ((1 << BL) - 1)) | (((high >> high_shift) & ((1 << BH) - 1)) << BL)


@triton.jit
def merge_planes(words, hi, BL: tl.constexpr):
    """Both planes' bits of every code in one of two words, a code to a slot of 2 * BL bits (its low bits, then its
    high bits): fields 0, 2, 4, ... in the first word, 1, 3, 5, ... in the second, field 2j or 2j + 1 at bit 2 * BL * j.
    hi: the low word's high word, shifted so that field f's high bits sit at bit f * BL."""
    if BL == 2:  # nf3: two low bits and a high bit in 4-bit slots
        LOW: tl.constexpr = 0x33333333
        HIGH: tl.constexpr = 0x44444444
    else:  # fp6: four low bits and two high bits in 8-bit slots
        LOW: tl.constexpr = 0x0F0F0F0F
        HIGH: tl.constexpr = 0x30303030
    even = (words & LOW) | ((hi << BL) & HIGH)
    odd = ((words >> BL) & LOW) | (hi & HIGH)
    return even, odd


@triton.jit
def _e3m2_in_place(merged, shift: tl.constexpr):
    """The fp6 code in the 8-bit slot at `shift` of a merge_planes word as a float32 worth its e3m2 value * 2**-124:
    its mantissa and three exponent bits to float32 bits 21..25 and its sign to 31 (exponent 0 reads as a
    subnormal, as e3m2's own subnormals scale)."""
    return float_code_bits(merged, shift + 5, 5, 21).to(tl.float32, bitcast=True)


@triton.jit
def pair_terms(F, pair_index, x_first, x_second, pair_ptr):
    """F plus two codes' f * x from one 8-byte load of the pair table (triton_operands.pair_table) at pair_index:
    its low half is the first code's float32 value, its high half the second's."""
    v = tl.load(pair_ptr + pair_index)
    first = v.to(tl.int32).to(tl.float32, bitcast=True)
    second = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    F += first * x_first[:, None]
    return F + second * x_second[:, None]


@triton.jit
def _plane_activations(xs, kbase, f: tl.constexpr, PER: tl.constexpr, tmask, EVEN: tl.constexpr,
                       X_TILE: tl.constexpr):
    """The float32 activations under field f of each low-plane word of the step: split_x_tile16's vector f where
    X_TILE (xs), else loaded from their runs' bases (kbase)."""
    if X_TILE:
        return xs[f]
    if EVEN:
        return tl.load(kbase + (f // PER + (32 // PER) * (f % PER))).to(tl.float32)
    return tl.load(kbase + (f // PER + (32 // PER) * (f % PER)), mask=tmask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["M", "N", "steps_per_split", "one_bits"])
def gemv_planes_kernel(
    x_ptr, w_ptr, s_ptr, mn_ptr, qh_ptr, tab_ptr, b_ptr, y_ptr,
    M, N, KW, stride_xm, stride_ym, steps_per_split, one_bits,
    KIND: tl.constexpr, SCALE_SHIFT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr, GATED: tl.constexpr = False,
    SUBNORMAL: tl.constexpr = False, LANES: tl.constexpr = False, X_TILE: tl.constexpr = False,
    part_ptr=None, arrived_ptr=None, LAST_SUMS: tl.constexpr = False,
):
    """y[m, n] = sum_k x[m, k] * w[n, k] for one activation row and BLOCK_N weight rows, BLOCK_W low-plane words
    per K step; grid (M, cdiv(N, BLOCK_N), SPLIT_K) as gemv_words_kernel's. PREFETCH is ignored: loading the next
    step early measured slower here (H200, nf3 4096x11008: 31.1 against 27.0 us). SUBNORMAL (fp6's e3m2 table
    only) reads the codes in place rather than looking them up (module docstring). LANES (nf3, CUDA only:
    lane_lookup) looks each code up by a warp shuffle from an 8-entry lane table, tab_ptr being nf3's plain table.
    X_TILE (nf3, the launcher setting it with LANES; fp6 read in place): a step's activations come from one
    [BLOCK_W, 16] load (nf3; [BLOCK_W, 8] for fp6: triton_gemv_tiles.load_x_tile), not sixteen (eight) vector loads
    each converted to the codes' layout through shared memory."""
    BL: tl.constexpr = 2 if KIND == CB3 else 4
    BH: tl.constexpr = 1 if KIND == CB3 else 2
    LOG_BL: tl.constexpr = 1 if KIND == CB3 else 2
    EPW: tl.constexpr = 32 // BL   # codes per low-plane word
    PER: tl.constexpr = 8 // BL    # codes per low-plane byte
    pid_m, pid_n, offs_n, rows, x_row, w_begin = gemv_program(x_ptr, N, stride_xm, steps_per_split, BLOCK_N, BLOCK_W,
                                                              GATED)
    if LANES:
        tl.static_assert(KIND == CB3, "LANES looks nf3's 8 values up (tab_ptr: the plain table)")
        tab_ptr = lane_table(tab_ptr, 8)
    # a scale covers GW words (4 for both formats' blocks); acc holds one entry per group, scaled once a step, so
    # the per-code arithmetic keeps the words' own layout (a scale per word made Triton convert every code's layout)
    GW: tl.constexpr = BL << SCALE_SHIFT
    tl.static_assert(BLOCK_W % GW == 0, "a K step holds whole scale groups")
    acc = tl.zeros([BLOCK_W // GW, BLOCK_N], dtype=tl.float32)
    for step in range(0, steps_per_split):
        t = w_begin + step * BLOCK_W + tl.arange(0, BLOCK_W)
        tmask = t < KW
        c = t & (BL - 1)
        flat = rows[None, :] * KW + t[:, None]    # word offset in the whole plane
        # the step's high words (BH a run, contiguous), loaded once and spread to the BL low words of their run
        # below: low word c reads high word c % BH, whose bits for field 0 start at BH * (c // BH)
        h = (w_begin + step * BLOCK_W) // BL * BH + tl.arange(0, BLOCK_W // BL * BH)
        hi_off = rows[None, :] * (KW // BL * BH) + h[:, None]
        group = w_begin + step * BLOCK_W + GW * tl.arange(0, BLOCK_W // GW)   # each group's first word
        s_off = (rows[None, :] * KW + group[:, None]) >> (LOG_BL + SCALE_SHIFT)
        kbase = x_row + (t >> LOG_BL) * 32 + c * 4
        if EVEN:
            words = tl.load(w_ptr + flat)
            hi = tl.load(qh_ptr + hi_off)
            d = tl.load(s_ptr + s_off).to(tl.float32)
        else:
            words = tl.load(w_ptr + flat, mask=tmask[:, None], other=0)
            hi = tl.load(qh_ptr + hi_off, mask=(h < KW // BL * BH)[:, None], other=0)
            d = tl.load(s_ptr + s_off, mask=(group < KW)[:, None], other=0.0).to(tl.float32)  # groups are whole
        hi = tl.reshape(tl.broadcast_to(tl.reshape(hi, [BLOCK_W // BL, 1, BH, BLOCK_N]),
                                        [BLOCK_W // BL, BL // BH, BH, BLOCK_N]), [BLOCK_W, BLOCK_N])
        even, odd = merge_planes(words, hi >> (BH * (c // BH))[:, None], BL)
        F = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
        if X_TILE:  # the activations as one tile (gemv_words_kernel's X_TILE)
            if KIND == CB3:  # sixteen a low-plane word, four runs of four
                xs = split_x_tile16(load_x_tile(x_row, w_begin, step, KW, BLOCK_W, EVEN, 16), BLOCK_W)
            else:  # fp6: eight, two runs of four, as a 4-bit word's (the ninth, their sum, unused)
                xs = split_x_tile(load_x_tile(x_row, w_begin, step, KW, BLOCK_W, EVEN), BLOCK_W)
        else:
            xs = kbase  # a placeholder, never indexed
        # each branch reads a code's activations where the measured kernels read them (the order sets the schedule)
        if KIND == CB3 and LANES:
            # a code's three bits at the bottom of its slot: the shuffle reads those three bits only
            for j in tl.static_range(EPW // 2):
                F += lane_lookup(tab_ptr, even >> (4 * j), 8) * _plane_activations(
                    xs, kbase, 2 * j, PER, tmask, EVEN, X_TILE)[:, None]
                F += lane_lookup(tab_ptr, odd >> (4 * j), 8) * _plane_activations(
                    xs, kbase, 2 * j + 1, PER, tmask, EVEN, X_TILE)[:, None]
        elif KIND == CB3:
            # codes 2j and 2j + 1 from one load of the pair table (tab_ptr), indexed by the two 3-bit codes
            for j in tl.static_range(EPW // 2):
                pair = place_bits(even, 4 * j, 0, 7) | place_bits(odd, 4 * j, 3, 0x38)
                F = pair_terms(F, pair, _plane_activations(xs, kbase, 2 * j, PER, tmask, EVEN, X_TILE),
                               _plane_activations(xs, kbase, 2 * j + 1, PER, tmask, EVEN, X_TILE), tab_ptr)
        elif SUBNORMAL:
            for j in tl.static_range(EPW // 2):
                x_even = _plane_activations(xs, kbase, 2 * j, PER, tmask, EVEN, X_TILE) * (
                    2.0 ** (124 - SUBNORMAL_BIAS))
                x_odd = _plane_activations(xs, kbase, 2 * j + 1, PER, tmask, EVEN, X_TILE) * (
                    2.0 ** (124 - SUBNORMAL_BIAS))
                F += _e3m2_in_place(even, 8 * j) * x_even[:, None]
                F += _e3m2_in_place(odd, 8 * j) * x_odd[:, None]
        else:
            for j in tl.static_range(EPW // 2):
                F += tl.load(tab_ptr + place_bits(even, 8 * j, 0, 63)) * _plane_activations(
                    xs, kbase, 2 * j, PER, tmask, EVEN, X_TILE)[:, None]
                F += tl.load(tab_ptr + place_bits(odd, 8 * j, 0, 63)) * _plane_activations(
                    xs, kbase, 2 * j + 1, PER, tmask, EVEN, X_TILE)[:, None]
        F = tl.sum(tl.reshape(F, [BLOCK_W // GW, GW, BLOCK_N]), axis=1)
        if SUBNORMAL:
            acc += ((2.0 ** SUBNORMAL_BIAS) * d) * F
        else:
            acc += d * F

    store_words_result(acc, b_ptr, y_ptr, pid_m, pid_n, offs_n, rows, N, stride_ym, SPLIT_K, HAS_BIAS, BLOCK_N, GATED,
                       True, M, part_ptr, arrived_ptr, LAST_SUMS)
