"""One-query decode attention (kernels.triton_decode_attention) against SDPA in float32; the decode step's KV write
(kernels.triton_kv_write) against index_copy_, and its RoPE-and-write against triton_rotary then the write, bit for bit.

The kernel computes in float32 and rounds once, so it lies within a few units in the last place of the dtype of the
float32 reference (relative to the largest output). Skipped without a GPU (or run with TRITON_INTERPRET=1 on the CPU).
"""
from __future__ import annotations

import pytest
import torch

from conftest import TRITON_INTERPRET, triton_device

INTERPRET, DEVICE = TRITON_INTERPRET, triton_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA or XPU device")]
triton = pytest.importorskip("triton")

from ipex_llm_tf.kernels import arrivals  # noqa: E402
from ipex_llm_tf.kernels import triton_decode_attention as TDA  # noqa: E402
from ipex_llm_tf.kernels.triton_kv_write import rotary_and_append_kv, rotary_and_write_kv, write_kv_slot  # noqa: E402
from ipex_llm_tf.kernels.triton_rotary import rotary  # noqa: E402
from ipex_llm_tf.kernels.reference import decode_attention_reference, quantize_kv_vectors  # noqa: E402
from ipex_llm_tf.kernels.triton_linear import fp8_native  # noqa: E402

ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -20}


def _inputs(batch: int, heads: int, kv_heads: int, keys: int, dim: int, dtype: torch.dtype, capacity: int):
    gen = torch.Generator().manual_seed(keys + heads)
    q = torch.randn(batch, heads, 1, dim, generator=gen).to(DEVICE, dtype)
    # a preallocated cache of `capacity` slots, of which the first `keys` are read: strided views, as in decoding
    k = torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(DEVICE, dtype)[:, :, :keys]
    v = torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(DEVICE, dtype)[:, :, :keys]
    return q, k, v


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, ulps: float = 4) -> None:
    assert got.shape == want.shape and got.dtype == dtype
    error = ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    assert error <= ulps * ULP[dtype], f"relative error {error:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,heads,kv_heads,keys,dim", [
    (1, 32, 32, 256, 128),   # Llama-2-7B, one graph span: several key splits
    (2, 8, 2, 37, 64),       # grouped KV heads, keys not a multiple of the key step
    (3, 4, 1, 1, 80),        # one key, head_dim not a power of two
    (1, 2, 2, 700, 128),     # few heads: many splits, the combine pass
])
def test_matches_sdpa(dtype: torch.dtype, batch: int, heads: int, kv_heads: int, keys: int, dim: int) -> None:
    q, k, v = _inputs(batch, heads, kv_heads, keys, dim, dtype, keys + 5)
    gen = torch.Generator().manual_seed(3)
    key_ok = torch.rand(batch, keys, generator=gen).to(DEVICE) > 0.3
    key_ok[:, -1] = True  # the token being decoded always sees itself
    key_ok[0, :keys // 2] = False  # left padding of row 0
    for mask in (key_ok, None):
        want = decode_attention_reference(q.float(), k.float(), v.float(), mask, dim ** -0.5)
        _check(TDA.decode_attention(q, k, v, mask, dim ** -0.5), want, dtype)


def test_masked_split_and_broadcast_mask() -> None:
    """A split whose keys are all masked adds nothing (no NaN); a [1, S] mask serves every batch row."""
    q, k, v = _inputs(2, 4, 4, 300, 64, torch.float16, 300)
    key_ok = torch.zeros(1, 300, dtype=torch.bool, device=DEVICE)
    key_ok[:, 250:] = True
    want = decode_attention_reference(q.float(), k.float(), v.float(), key_ok.expand(2, 300), 0.125)
    _check(TDA.decode_attention(q, k, v, key_ok.expand(2, 300), 0.125), want, torch.float16)


def test_masked_slots_holding_nan_leave_no_trace() -> None:
    """Masked keys count for nothing, whatever their slots hold: NaN / inf values, float8 NaN codes or NaN scales
    give the output of a cache with those slots zeroed."""
    q, k, v = _inputs(2, 8, 2, 70, 64, torch.float16, 70)
    key_ok = torch.ones(2, 70, dtype=torch.bool, device=DEVICE)
    key_ok[0, :33] = False  # a whole key step of row 0 masked, and part of the next
    key_ok[1, 50:60] = False
    clean = [t.clone() for t in (k, v)]
    for t, bad in ((k, float("nan")), (v, float("inf"))):
        t.masked_fill_(~key_ok[:, None, :, None], bad)
    want = decode_attention_reference(q.float(), clean[0].float(), clean[1].float(), key_ok, 0.125)
    _check(TDA.decode_attention(q, k, v, key_ok, 0.125), want, torch.float16)
    (kc, ks), (vc, vs) = quantize_kv_vectors(clean[0]), quantize_kv_vectors(clean[1])
    want = decode_attention_reference(q.float(), kc, vc, key_ok, 0.125, (ks, vs))
    hidden = ~key_ok[:, None, :, None]
    for codes in (kc, vc):
        codes.view(torch.uint8).masked_fill_(hidden, 0x7F)  # e4m3fn NaN
    for scale in (ks, vs):
        scale.masked_fill_(hidden, float("nan"))
    _check(TDA.decode_attention(q, kc, vc, key_ok, 0.125, (ks, vs)), want.float(), torch.float16)


def test_last_split_combines_and_leaves_counters_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last split to arrive combines (counters back at zero after every call, so calls repeat exactly), and
    equals the separate combine kernel that runs while a graph capture finds no counters."""
    q, k, v = _inputs(2, 4, 2, 700, 64, torch.float16, 700)
    key_ok = torch.rand(2, 700, generator=torch.Generator().manual_seed(5)).to(DEVICE) > 0.2
    want = decode_attention_reference(q.float(), k.float(), v.float(), key_ok, 0.125)
    first = TDA.decode_attention(q, k, v, key_ok, 0.125)
    counters = TDA._ARRIVALS.buffers[q.device]
    assert TDA._splits(8, 700, q.device) > 1 and int(counters.abs().sum()) == 0
    _check(first, want, torch.float16)
    assert torch.equal(TDA.decode_attention(q, k, v, key_ok, 0.125), first)
    assert int(counters.abs().sum()) == 0
    monkeypatch.setattr(arrivals, "capturing", lambda device: True)  # a capture with no counters large enough
    monkeypatch.setattr(TDA, "_ARRIVALS", arrivals.ArrivalCounters())
    assert TDA._ARRIVALS.get(q.device, 8) is None
    separate = TDA.decode_attention(q, k, v, key_ok, 0.125)
    _check(separate, want, torch.float16)
    torch.testing.assert_close(separate, first, rtol=2 ** -10, atol=0)


def test_rejects_bad_shapes() -> None:
    q, k, v = _inputs(1, 6, 4, 8, 64, torch.float16, 8)
    with pytest.raises(ValueError, match="H_kv dividing H"):
        TDA.decode_attention(q, k, v, None, 0.125)
    q, k, v = _inputs(1, 4, 4, 8, 64, torch.float16, 8)
    with pytest.raises(ValueError, match=r"q \[B, H, 1, D\]"):
        TDA.decode_attention(q.expand(1, 4, 2, 64), k, v, None, 0.125)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kv_write_matches_index_copy(dtype: torch.dtype) -> None:
    keys, values = (torch.randn(2, 4, 40, 80, device=DEVICE).to(dtype) for _ in range(2))
    want_k, want_v = keys.clone(), values.clone()
    qkv = torch.randn(2, 1, 12, 80, device=DEVICE).to(dtype).transpose(1, 2)  # strided views, as in a step
    key, value = qkv[:, 4:8], qkv[:, 8:]
    slot = torch.tensor([17], device=DEVICE)
    write_kv_slot(key, value, keys[:, :, :32], values[:, :, :32], slot)
    want_k.index_copy_(2, slot, key)
    want_v.index_copy_(2, slot, value)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


def test_kv_write_rejects_bad_shapes() -> None:
    keys = torch.zeros(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one-token key/value"):
        write_kv_slot(keys[:, :, :2], keys[:, :, :2], keys, keys.clone(), torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="unit last stride"):
        bad = torch.zeros(1, 2, 16, 8, device=DEVICE).transpose(2, 3)
        write_kv_slot(keys[:, :, :1], keys[:, :, :1], bad, bad.clone(), torch.tensor([0], device=DEVICE))


def test_float8_cache_matches_sdpa_over_dequantized() -> None:
    """Float8 keys / values with per-vector scales: the same result as SDPA over the dequantized cache."""
    q, k, v = _inputs(2, 8, 2, 300, 64, torch.float16, 310)
    (kc, ks), (vc, vs) = quantize_kv_vectors(k), quantize_kv_vectors(v)
    key_ok = torch.ones(2, 300, dtype=torch.bool, device=DEVICE)
    key_ok[1, :40] = False
    want = decode_attention_reference(q.float(), kc, vc, key_ok, 0.125, (ks, vs))
    _check(TDA.decode_attention(q, kc, vc, key_ok, 0.125, (ks, vs)), want.float(), torch.float16)
    with pytest.raises(ValueError, match="float8 e4m3 keys and values with kv_scales"):
        TDA.decode_attention(q, kc, vc, key_ok, 0.125)


@pytest.mark.skipif(DEVICE != "cuda" or not fp8_native(torch.device("cuda")),
                    reason="quantizing in the kernel needs Triton's float8 conversion (CUDA sm_89+)")
def test_kv_write_quantizes_like_the_fp8_cache() -> None:
    keys, values = (torch.zeros(2, 4, 40, 64, device=DEVICE, dtype=torch.float8_e4m3fn) for _ in range(2))
    scales = tuple(torch.zeros(2, 4, 40, 1, device=DEVICE) for _ in range(2))
    key, value = (torch.randn(2, 4, 1, 64, device=DEVICE, dtype=torch.float16) * 3 for _ in range(2))
    key[0, 0] = 0.0  # an all-zero vector: the clamped scale, zero codes
    slot = torch.tensor([9], device=DEVICE)
    write_kv_slot(key, value, keys, values, slot, scales)
    for states, codes, scale in ((key, keys, scales[0]), (value, values, scales[1])):
        want_codes, want_scale = quantize_kv_vectors(states)
        assert torch.equal(codes[:, :, 9:10].view(torch.uint8), want_codes.view(torch.uint8))
        assert torch.equal(scale[:, :, 9:10], want_scale)


def _merged_token(batch: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, tokens: int = 1):
    """One token's (or `tokens` tokens') merged q/k/v projection [B, S, H + 2 H_kv, D] as a layer has it (a view of
    a wider output), with cos / sin as transformers' rotary embedding gives them."""
    gen = torch.Generator().manual_seed(heads + dim)
    wide = torch.randn(batch, tokens, heads + 2 * kv_heads + 3, dim, generator=gen).to(DEVICE, dtype)
    angle = torch.rand(batch, tokens, dim // 2, generator=gen).to(DEVICE) * 6.0
    cos, sin = (torch.cat([f(angle), f(angle)], dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    return wide[:, :, :heads + 2 * kv_heads], cos, sin


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 64), (8, 2, 80)])
def test_rotary_and_write_kv_equals_rotary_then_write(dtype, heads, kv_heads, dim) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 arithmetic")
    qkv, cos, sin = _merged_token(2, heads, kv_heads, dim, dtype)
    planes = [torch.randn(2, kv_heads, 40, dim, device=DEVICE).to(dtype) for _ in range(2)]
    want_planes = [plane.clone() for plane in planes]
    slot = torch.tensor([23], device=DEVICE)
    query_key = rotary(qkv[:, :, :heads + kv_heads].transpose(1, 2), cos, sin)
    want_query, key = query_key.split([heads, kv_heads], dim=1)
    write_kv_slot(key, qkv[:, :, heads + kv_heads:].transpose(1, 2), *want_planes, slot)
    for cos_sin in ((cos, sin), (cos[:1], sin[:1])):  # per-row positions, and one row broadcast
        if cos_sin[0].shape[0] == 1:
            query_key = rotary(qkv[:, :, :heads + kv_heads].transpose(1, 2), *cos_sin)
            want_query, key = query_key.split([heads, kv_heads], dim=1)
            write_kv_slot(key, qkv[:, :, heads + kv_heads:].transpose(1, 2), *want_planes, slot)
        query = rotary_and_write_kv(qkv, *cos_sin, heads, kv_heads, planes[0][:, :, :32], planes[1][:, :, :32], slot)
        assert torch.equal(query, want_query), "query heads"
        assert torch.equal(planes[0], want_planes[0]) and torch.equal(planes[1], want_planes[1]), "cache planes"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads, dim, tokens, first", [(4, 4, 64, 7, 0), (8, 2, 80, 33, 5)])
def test_rotary_and_append_kv_equals_rotary_then_copies(dtype, heads, kv_heads, dim, tokens, first) -> None:
    """A prompt's RoPE and cache write in one kernel: the rotary kernel's query, and its keys and the values in
    slots first.. of the planes, bit for bit, for per-row and broadcast positions; nothing else written."""
    qkv, cos, sin = _merged_token(2, heads, kv_heads, dim, dtype, tokens)
    for cos_sin in ((cos, sin), (cos[:1], sin[:1])):
        planes = [torch.randn(2, kv_heads, 48, dim, device=DEVICE).to(dtype) for _ in range(2)]
        want_planes = [plane.clone() for plane in planes]
        query_key = rotary(qkv[:, :, :heads + kv_heads].transpose(1, 2), *cos_sin)
        want_planes[0][:, :, first:first + tokens] = query_key[:, heads:]
        want_planes[1][:, :, first:first + tokens] = qkv[:, :, heads + kv_heads:].transpose(1, 2)
        query = rotary_and_append_kv(qkv, *cos_sin, heads, kv_heads, *planes, first)
        assert torch.equal(query, query_key[:, :heads]), "query heads"
        assert torch.equal(planes[0], want_planes[0]) and torch.equal(planes[1], want_planes[1]), "cache planes"
    with pytest.raises(ValueError, match="not all inside planes of 48 slots"):
        rotary_and_append_kv(qkv, cos, sin, heads, kv_heads, *planes, 48 - tokens + 1)
    with pytest.raises(ValueError, match="H \\+ 2 H_kv"):
        rotary_and_append_kv(qkv, cos, sin, heads + 1, kv_heads, *planes, 0)


@pytest.mark.skipif(DEVICE != "cuda" or not fp8_native(torch.device("cuda")),
                    reason="quantizing in the kernel needs Triton's float8 conversion (CUDA sm_89+)")
def test_rotary_and_write_kv_quantizes_like_the_fp8_cache() -> None:
    qkv, cos, sin = _merged_token(2, 8, 2, 64, torch.float16)
    qkv = qkv * 3
    planes = [torch.zeros(2, 2, 40, 64, device=DEVICE, dtype=torch.float8_e4m3fn) for _ in range(2)]
    scales = tuple(torch.zeros(2, 2, 40, 1, device=DEVICE) for _ in range(2))
    want_planes = [plane.clone() for plane in planes]
    want_scales = tuple(scale.clone() for scale in scales)
    slot = torch.tensor([5], device=DEVICE)
    query_key = rotary(qkv[:, :, :10].transpose(1, 2), cos, sin)
    write_kv_slot(query_key[:, 8:], qkv[:, :, 10:].transpose(1, 2), *want_planes, slot, want_scales)
    query = rotary_and_write_kv(qkv, cos, sin, 8, 2, *planes, slot, scales)
    assert torch.equal(query, query_key[:, :8])
    for got, want in zip(planes + list(scales), want_planes + list(want_scales)):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)


def test_rotary_and_write_kv_rejects_bad_shapes() -> None:
    qkv, cos, sin = _merged_token(1, 4, 2, 64, torch.float16)
    planes = [torch.zeros(1, 2, 8, 64, device=DEVICE, dtype=torch.float16) for _ in range(2)]
    slot = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="H \\+ 2 H_kv"):
        rotary_and_write_kv(qkv, cos, sin, 4, 3, *planes, slot)
    with pytest.raises(ValueError, match="H \\+ 2 H_kv"):
        rotary_and_write_kv(torch.cat([qkv, qkv], dim=1), cos, sin, 4, 2, *planes, slot)
    with pytest.raises(ValueError, match="unit last stride"):
        bad = torch.zeros(1, 2, 64, 8, device=DEVICE, dtype=torch.float16).transpose(2, 3)
        rotary_and_write_kv(qkv, cos, sin, 4, 2, bad, bad.clone(), slot)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, heads, kv_heads, dim, span, slot", [
    (1, 32, 32, 128, 256, 40),   # Llama-2-7B's step: the slot in the second of several key splits
    (2, 8, 2, 80, 70, 69),       # grouped KV heads, head_dim not a power of two, the slot last
    (1, 4, 4, 64, 20, 0),        # one split (no combine), the slot first
])
def test_rotary_decode_attention_equals_rotary_write_then_attention(dtype, batch, heads, kv_heads, dim, span,
                                                                    slot) -> None:
    """The fused kernel gives the two-kernel path's query output and cache planes, bit for bit, for per-row and
    broadcast positions, a mask with holes and the slot anywhere in the span."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 arithmetic")
    qkv, cos, sin = _merged_token(batch, heads, kv_heads, dim, dtype)
    gen = torch.Generator().manual_seed(span)
    planes = [torch.randn(batch, kv_heads, span + 8, dim, generator=gen).to(DEVICE, dtype) for _ in range(2)]
    key_ok = torch.rand(batch, span, generator=gen).to(DEVICE) > 0.25
    key_ok[:, slot] = True
    where = torch.tensor([slot], device=DEVICE)
    for cos_sin in ((cos, sin), (cos[:1], sin[:1])):
        want_planes = [plane.clone() for plane in planes]
        query = rotary_and_write_kv(qkv, *cos_sin, heads, kv_heads, *(p[:, :, :span] for p in want_planes), where)
        want = TDA.decode_attention(query, *(p[:, :, :span] for p in want_planes), key_ok, dim ** -0.5)
        got = TDA.rotary_decode_attention(qkv, *cos_sin, heads, kv_heads, *(p[:, :, :span] for p in planes), where,
                                          key_ok, dim ** -0.5)
        assert torch.equal(got, want), "attention output"
        assert torch.equal(planes[0], want_planes[0]) and torch.equal(planes[1], want_planes[1]), "cache planes"


def test_rotary_decode_attention_rejects_bad_shapes() -> None:
    qkv, cos, sin = _merged_token(1, 4, 2, 64, torch.float16)
    planes = [torch.zeros(1, 2, 8, 64, device=DEVICE, dtype=torch.float16) for _ in range(2)]
    slot = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="rotary_decode_attention takes one token's qkv"):
        TDA.rotary_decode_attention(qkv, cos, sin, 4, 1, *planes, slot, None, 0.125)
    with pytest.raises(ValueError, match="H_kv dividing H"):
        TDA.rotary_decode_attention(torch.cat([qkv, qkv[:, :, :1]], dim=2), cos, sin, 3, 2, *planes, slot, None,
                                    0.125)
    fp8 = [plane.to(torch.float8_e4m3fn) for plane in planes]
    with pytest.raises(ValueError, match="of its dtype"):
        TDA.rotary_decode_attention(qkv, cos, sin, 4, 2, *fp8, slot, None, 0.125)


def test_decode_context_attention_gives_the_output_projection_its_input() -> None:
    """kernels.decode_context's timing call: decode attention of the layer's shape, [rows, heads * head_dim]."""
    from ipex_llm_tf.kernels.decode_context import AfterAttention
    make = AfterAttention(heads=4, kv_heads=2, head_dim=32).input_maker(2, torch.float16, torch.device(DEVICE))
    x = make()
    assert x.shape == (2, 128) and x.dtype == torch.float16 and bool(torch.isfinite(x).all())
    assert torch.equal(make(), x)  # the same operands every call
