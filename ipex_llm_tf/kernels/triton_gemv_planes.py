"""Fused dequantize + GEMV for the two-plane codebook formats (nf3: 2-bit + 1-bit planes, fp6: 4-bit + 2-bit).

The formats (formats/codebooks.py) store a code's low bits in one plane and its high bits in another, each packed
in runs of 32 inputs. Word t of the low plane (BL bits a code, so 32 / BL codes a word and BL words a run) holds, in
field f (bits f*BL ..), the code of element

    32 * run + 4 * c + f // P + (32 / P) * (f % P),     run = t // BL, c = t % BL, P = 8 // BL codes per byte.

The high plane (BH bits a code, BH words a run) holds the same element's high bits in its word run * BH + c % BH,
at bit f * BL once that word is shifted right by BH * (c // BH). So one shift of each high word per low word lines
the two planes up, and a code costs two shift-and-masks, an OR and the table load, as nf4's does plus the high bits.
nf3 looks its codes up two at a time: fields f and f + 1 (f even) have their low bits side by side and their high
bits two apart, so one shift-and-mask of each plane gives a 7-bit index into a table of value pairs (triton_operands.
pair_table, 1 KB of int64), half the loads (H100: 11008x4096 30.9 -> 26.9 us, 4096x11008 26.8 -> 26.0). nf4's pair
table (256 entries) measured slower than its 16-entry one (19.9 -> 28.9 us). On CUDA (LANES, kernels/lane_lookup)
nf3's codes are instead looked up one at a time by warp shuffles from an 8-entry lane table, as nf4's are.
fp6's table is e3m2 (bias 3), itself a float format: with SUBNORMAL (set where the device keeps float32 subnormals,
as for triton_gemv's in-place codes) its codes are read in place instead, their five exponent and mantissa bits at
float32 bits 21..25 and the sign at bit 31 worth value * 2**-124, against activations pre-scaled by
2**(124 - SUBNORMAL_BIAS): the table path's products times 2**-SUBNORMAL_BIAS, so the same bits without the load.
Tests check these positions against the formats' own unpacking (tests/gpu/test_triton_linear.py).

Same tiles and grid as triton_gemv.gemv_words_kernel, and the same launch arguments (mn_ptr and one_bits unused;
qh_ptr is the high plane as int32 words), so the launcher and autotuning serve both kernels.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .lane_lookup import lane_lookup, lane_table
from .triton_gemv import CB3, SUBNORMAL_BIAS
from .triton_gemv_tiles import gemv_program, place_bits, store_words_result


@triton.jit
def join_planes(low, high, low_shift, high_shift, BL: tl.constexpr, BH: tl.constexpr):
    """The code whose BL low bits sit at low_shift in `low` and BH high bits at high_shift in `high`."""
    return ((low >> low_shift) & ((1 << BL) - 1)) | (((high >> high_shift) & ((1 << BH) - 1)) << BL)


@triton.jit
def _e3m2_in_place(low, high, shift: tl.constexpr):
    """The fp6 code at bit `shift` of both planes as a float32 worth its e3m2 value * 2**-124: the low plane's
    mantissa and two exponent bits to float32 bits 21..24, the high plane's third exponent bit to 25 and sign to 31
    (exponent 0 reads as a subnormal, as e3m2's own subnormals scale)."""
    bits = (place_bits(low, shift, 21, 0x1E00000) | place_bits(high, shift, 25, 0x2000000)
            | place_bits(high, shift + 1, 31, -0x80000000))
    return bits.to(tl.float32, bitcast=True)


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
def _plane_activations(kbase, f: tl.constexpr, PER: tl.constexpr, tmask, EVEN: tl.constexpr):
    """The float32 activations under field f of each low-plane word of the step (kbase: their runs' bases)."""
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
    SUBNORMAL: tl.constexpr = False, LANES: tl.constexpr = False,
):
    """y[m, n] = sum_k x[m, k] * w[n, k] for one activation row and BLOCK_N weight rows, BLOCK_W low-plane words
    per K step; grid (M, cdiv(N, BLOCK_N), SPLIT_K) as gemv_words_kernel's. PREFETCH is ignored: loading the next
    step early measured slower here (H200, nf3 4096x11008: 31.1 against 27.0 us). SUBNORMAL (fp6's e3m2 table
    only) reads the codes in place rather than looking them up (module docstring). LANES (nf3, CUDA only:
    lane_lookup) looks each code up by a warp shuffle from an 8-entry lane table, tab_ptr being nf3's plain table."""
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
    acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
    for step in range(0, steps_per_split):
        t = w_begin + step * BLOCK_W + tl.arange(0, BLOCK_W)
        tmask = t < KW
        c = t & (BL - 1)
        flat = rows[None, :] * KW + t[:, None]    # word offset in the whole plane
        # the run's high word for this low word, and where its bits for field 0 start
        hi_off = (flat >> LOG_BL) * BH + (c % BH)[:, None]
        s_off = flat >> (LOG_BL + SCALE_SHIFT)    # a scale covers BL << SCALE_SHIFT words
        kbase = x_row + (t >> LOG_BL) * 32 + c * 4
        if EVEN:
            words = tl.load(w_ptr + flat)
            hi = tl.load(qh_ptr + hi_off)
            d = tl.load(s_ptr + s_off).to(tl.float32)
        else:
            words = tl.load(w_ptr + flat, mask=tmask[:, None], other=0)
            hi = tl.load(qh_ptr + hi_off, mask=tmask[:, None], other=0)
            d = tl.load(s_ptr + s_off, mask=tmask[:, None], other=0.0).to(tl.float32)
        hi = hi >> (BH * (c // BH))[:, None]
        F = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
        if KIND == CB3 and LANES:
            # the 2-bit low field at bits 0..1 and the high bit at bit 2: the shuffle reads those three bits only
            for f in tl.static_range(EPW):
                code = (words >> (2 * f)) & 3 | place_bits(hi, 2 * f, 2, 4)
                F += lane_lookup(tab_ptr, code, 8) * _plane_activations(kbase, f, PER, tmask, EVEN)[:, None]
        elif KIND == CB3:
            # fields f and f + 1 from one load of the pair table (tab_ptr): their low bits are the 4 bits at 2f of
            # the low word, their high bits bits 2f and 2f + 2 of the shifted high word, moved up to bits 4 and 6
            # as they lie (a 64-entry table without the gaps measured slower: two more instructions a pair)
            for f in tl.static_range(0, EPW, 2):
                pair = place_bits(words, 2 * f, 0, 15) | place_bits(hi, 2 * f, 4, 0x50)
                F = pair_terms(F, pair, _plane_activations(kbase, f, PER, tmask, EVEN),
                               _plane_activations(kbase, f + 1, PER, tmask, EVEN), tab_ptr)
        else:
            for f in tl.static_range(EPW):
                xf = _plane_activations(kbase, f, PER, tmask, EVEN)
                if SUBNORMAL:
                    F += _e3m2_in_place(words, hi, f * BL) * (xf * (2.0 ** (124 - SUBNORMAL_BIAS)))[:, None]
                else:
                    F += tl.load(tab_ptr + join_planes(words, hi, f * BL, f * BL, BL, BH)) * xf[:, None]
        if SUBNORMAL:
            acc += ((2.0 ** SUBNORMAL_BIAS) * d) * F
        else:
            acc += d * F

    store_words_result(acc, b_ptr, y_ptr, pid_m, pid_n, offs_n, rows, N, stride_ym, SPLIT_K, HAS_BIAS, BLOCK_N, GATED)
