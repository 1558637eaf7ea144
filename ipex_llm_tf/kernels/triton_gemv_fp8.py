"""fp8 weights (e4m3fn / e5m2, a float32 scale per output row): the decode GEMV, and the byte decoding that the fp8
tile matmul and the fp8 KV cache's attention share.

Where Triton has no float8 type for the device, codes are read as their uint8 bytes and rebuilt as fp16 bit patterns
(exact for both kinds: e5m2 is fp16's top byte, e4m3 lands 8 binary exponents low and is fixed with the scale).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch_overlap import release_next, wait_previous
from .triton_gemv_tiles import store_row


@triton.jit
def fp8_bytes_to_float(q, E5M2: tl.constexpr, NATIVE: tl.constexpr, TY: tl.constexpr):
    """fp8 codes q as TY: q is float8 when NATIVE, else its uint8 bytes (then e4m3 comes out 2**-8 too small)."""
    if NATIVE:
        w = q.to(TY)
    else:
        # the byte's bits placed as an fp16 bit pattern: exact for e5m2, e4m3 lands 8 binary exponents low
        q16 = q.to(tl.int16)
        if E5M2:
            h = q16 << 8
        else:
            h = ((q16 & 0x80) << 8) | ((q16 & 0x7F) << 7)
        w = h.to(tl.float16, bitcast=True).to(TY)
    return w



@triton.jit(do_not_specialize=["M", "N", "steps_per_split"])
def gemv_fp8_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, steps_per_split,
    E5M2: tl.constexpr, NATIVE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr, OVERLAP: tl.constexpr = False,
    part_ptr=None, arrived_ptr=None, LAST_SUMS: tl.constexpr = False,
):
    """fp8 weights [N, K] with a float32 scale per row: y = scale[n] * sum_k x[m, k] * w[n, k].

    NATIVE reads w through a float8 pointer and lets Triton convert; otherwise w is the uint8 view and the bytes are
    rebuilt as fp16 bit patterns (exact for both fp8 kinds; e4m3 comes out 2**-8 too small, fixed with the scale).
    Split pid_k covers K [pid_k, pid_k + 1) * steps_per_split * BLOCK_K.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    k_begin = pid_k * steps_per_split * BLOCK_K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_next = k_begin + tl.arange(0, BLOCK_K)
    if EVEN:
        q_next = tl.load(w_rows + k_next[None, :])
    else:
        q_next = tl.load(w_rows + k_next[None, :], mask=(k_next < K)[None, :])
    wait_previous(OVERLAP)  # the first weights are in flight; the activations are the previous kernel's output
    for step in range(0, steps_per_split):
        k = k_begin + step * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = k < K
        if PREFETCH:
            q = q_next
            k_next = k_begin + tl.minimum(step + 1, steps_per_split - 1) * BLOCK_K + tl.arange(0, BLOCK_K)
            if EVEN:
                q_next = tl.load(w_rows + k_next[None, :])
            else:
                q_next = tl.load(w_rows + k_next[None, :], mask=(k_next < K)[None, :])
            tl.debug_barrier()  # keeps the prefetch above this step's arithmetic (see gemv_words_kernel)
        elif EVEN:
            q = tl.load(w_rows + k[None, :])
        else:
            q = tl.load(w_rows + k[None, :], mask=kmask[None, :])
        if EVEN:
            xk = tl.load(x_row + k).to(tl.float32)
        else:
            xk = tl.load(x_row + k, mask=kmask, other=0.0).to(tl.float32)
        w = fp8_bytes_to_float(q, E5M2, NATIVE, tl.float32)
        if not EVEN:
            w = tl.where(kmask[None, :], w, 0.0)  # masked lanes hold garbage (possibly NaN codes)
        acc += w * xk[None, :]
    release_next(OVERLAP)  # the next kernel's programs take the SMs this one's tail leaves idle
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rows)
    if not NATIVE and not E5M2:
        y = y * 256.0
    store_row(y, b_ptr, y_ptr, pid_m, offs_n, rows, N, stride_ym, SPLIT_K, HAS_BIAS, True, M, part_ptr, arrived_ptr,
              LAST_SUMS)
