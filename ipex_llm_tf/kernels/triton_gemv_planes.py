"""Fused dequantize + GEMV for the two-plane codebook formats (nf3: 2-bit + 1-bit planes, fp6: 4-bit + 2-bit).

The formats (formats/codebooks.py) store a code's low bits in one plane and its high bits in another, each packed
in runs of 32 inputs. Word t of the low plane (BL bits a code, so 32 / BL codes a word and BL words a run) holds, in
field f (bits f*BL ..), the code of element

    32 * run + 4 * c + f // P + (32 / P) * (f % P),     run = t // BL, c = t % BL, P = 8 // BL codes per byte.

The high plane (BH bits a code, BH words a run) holds the same element's high bits in its word run * BH + c % BH,
at bit f * BL once that word is shifted right by BH * (c // BH). So one shift of each high word per low word lines
the two planes up, and a code costs two shift-and-masks, an OR and the table load, as nf4's does plus the high bits.
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

from .triton_gemv import CB3, SUBNORMAL_BIAS, _gemv_program, _store_words_result, place_bits


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


@triton.jit(do_not_specialize=["M", "N", "steps_per_split", "one_bits"])
def gemv_planes_kernel(
    x_ptr, w_ptr, s_ptr, mn_ptr, qh_ptr, tab_ptr, b_ptr, y_ptr,
    M, N, KW, stride_xm, stride_ym, steps_per_split, one_bits,
    KIND: tl.constexpr, SCALE_SHIFT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr, GATED: tl.constexpr = False,
    SUBNORMAL: tl.constexpr = False,
):
    """y[m, n] = sum_k x[m, k] * w[n, k] for one activation row and BLOCK_N weight rows, BLOCK_W low-plane words
    per K step; grid (M, cdiv(N, BLOCK_N), SPLIT_K) as gemv_words_kernel's. PREFETCH is ignored: loading the next
    step early measured slower here (H200, nf3 4096x11008: 31.1 against 27.0 us). SUBNORMAL (fp6's e3m2 table
    only) reads the codes in place rather than looking them up (module docstring)."""
    BL: tl.constexpr = 2 if KIND == CB3 else 4
    BH: tl.constexpr = 1 if KIND == CB3 else 2
    LOG_BL: tl.constexpr = 1 if KIND == CB3 else 2
    EPW: tl.constexpr = 32 // BL   # codes per low-plane word
    PER: tl.constexpr = 8 // BL    # codes per low-plane byte
    pid_m, pid_n, offs_n, rows, x_row, w_begin = _gemv_program(x_ptr, N, stride_xm, steps_per_split, BLOCK_N, BLOCK_W,
                                                               GATED)
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
        for f in tl.static_range(EPW):
            if EVEN:
                xf = tl.load(kbase + (f // PER + (32 // PER) * (f % PER))).to(tl.float32)
            else:
                xf = tl.load(kbase + (f // PER + (32 // PER) * (f % PER)), mask=tmask, other=0.0).to(tl.float32)
            if SUBNORMAL:
                F += _e3m2_in_place(words, hi, f * BL) * (xf * (2.0 ** (124 - SUBNORMAL_BIAS)))[:, None]
            else:
                F += tl.load(tab_ptr + join_planes(words, hi, f * BL, f * BL, BL, BH)) * xf[:, None]
        if SUBNORMAL:
            acc += ((2.0 ** SUBNORMAL_BIAS) * d) * F
        else:
            acc += d * F

    _store_words_result(acc, b_ptr, y_ptr, pid_m, pid_n, offs_n, rows, N, stride_ym, SPLIT_K, HAS_BIAS, BLOCK_N, GATED)
