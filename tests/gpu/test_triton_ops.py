"""Fused Triton ops (RMSNorm, rotary, RoPE angles, SiLU-and-mul, a greedy step's next inputs) against their PyTorch
references, on a CUDA or XPU device.

Rotary rounds where the reference rounds and must equal it bit for bit. Tolerances for the others, relative to the
largest reference value: RMSNorm rounds where the reference rounds, so it agrees to one unit in the last place of the
dtype (rsqrt may differ in its last bit); SiLU-and-mul likewise, the sigmoid being computed by a different exp.
Skipped without a GPU (or run with TRITON_INTERPRET=1 on the CPU).
"""
from __future__ import annotations

import pytest
import torch

from conftest import TRITON_INTERPRET, triton_device

INTERPRET, DEVICE = TRITON_INTERPRET, triton_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA or XPU device")]
triton = pytest.importorskip("triton")

from ipex_llm_tf.kernels.reference import (next_greedy_inputs_reference, rms_norm_reference,  # noqa: E402
                                           rope_angles_reference, rotary_reference, silu_and_mul_reference)
from ipex_llm_tf.kernels.triton_greedy_inputs import next_greedy_inputs  # noqa: E402
from ipex_llm_tf.kernels.triton_rms_norm import add_rms_norm, embed_rms_norm, rms_norm  # noqa: E402
from ipex_llm_tf.kernels.triton_rope_angles import rope_angles  # noqa: E402
from ipex_llm_tf.kernels.triton_rotary import rotary  # noqa: E402
from ipex_llm_tf.kernels.triton_silu_mul import silu_and_mul  # noqa: E402

ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -22}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    differ = (got != want).sum().item()
    largest = (got.float() - want.float()).abs().max().item()
    assert differ == 0, f"{differ} of {want.numel()} elements differ (the largest by {largest:.3e})"


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, ulps: float = 2) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    error = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()
    assert error <= ulps * ULP[dtype], f"relative error {error:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 7, 576), (5, 128), (2, 4, 9, 100)])
def test_rms_norm(dtype: torch.dtype, shape: tuple) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the interpreter does not emulate bfloat16 arithmetic (its rows come out NaN); run on a device")
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    w = torch.rand(shape[-1], generator=gen).add(0.5).to(DEVICE, dtype)
    _close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), dtype)


def test_rms_norm_strided_rows_and_float32_weight() -> None:
    x = torch.randn(6, 2 * 64, device=DEVICE, dtype=torch.float16)[:, :64]
    w = torch.rand(64, device=DEVICE) + 0.5
    _close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 7, 576)])
def test_add_rms_norm(dtype: torch.dtype, shape: tuple) -> None:
    """The sum is exactly the eager `residual + x`; the norm is rms_norm of that sum."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the interpreter rounds bfloat16 sums by truncation, the devices to nearest even")
    gen = torch.Generator().manual_seed(2)
    x, residual = ((torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype) for _ in range(2))
    w = torch.rand(shape[-1], generator=gen).add(0.5).to(DEVICE, dtype)
    normed, summed = add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(summed, residual + x)
    _close(normed, rms_norm_reference(residual + x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids_shape", [(1, 1), (3, 1), (2, 5)])
def test_embed_rms_norm_equals_the_lookup_then_the_norm(dtype: torch.dtype, ids_shape: tuple) -> None:
    """The gathered rows are the table's, bit for bit, and their norm is rms_norm's of them, bit for bit (the same
    kernel, its rows picked by the ids)."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 arithmetic")
    generator = torch.Generator().manual_seed(3)
    table = (torch.randn(1000, 576, generator=generator) * 3).to(DEVICE, dtype)
    weight = torch.rand(576, generator=generator).to(DEVICE, dtype) + 0.5
    ids = torch.randint(0, 1000, ids_shape, generator=generator).to(DEVICE)
    normed, hidden = embed_rms_norm(ids, table, weight, 1e-5)
    _equal(hidden, torch.nn.functional.embedding(ids, table))
    _equal(normed, rms_norm(hidden, weight, 1e-5))
    _close(normed, rms_norm_reference(hidden, weight, 1e-5), dtype)
    with pytest.raises(ValueError, match="integer ids"):
        embed_rms_norm(ids.float(), table, weight, 1e-5)


def test_add_rms_norm_rejects_mismatched_inputs() -> None:
    x = torch.randn(2, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="x and residual alike"):
        add_rms_norm(x, x.float(), torch.ones(64, device=DEVICE), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 2 * 11008), (9, 2 * 1536), (4, 2 * 100)])
def test_silu_and_mul(dtype: torch.dtype, rows: int, width: int) -> None:
    x = (torch.randn(rows, width, generator=torch.Generator().manual_seed(1)) * 4).to(DEVICE, dtype)
    _close(silu_and_mul(x), silu_and_mul_reference(x), dtype, ulps=4)


def test_silu_and_mul_rejects_odd_width() -> None:
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 5, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,seq,dim", [(1, 32, 1, 128), (2, 9, 7, 64), (3, 5, 4, 80), (2, 4, 1, 64)])
def test_rotary_on_strided_views(dtype: torch.dtype, batch: int, heads: int, seq: int, dim: int) -> None:
    """Bit-equal to the reference: the kernel rounds each product and the sum as its three eager ops do (which needs
    it compiled without fused multiply-adds). (2, 4, 1, 64) gives one element per thread, where fusing showed."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the interpreter rounds bfloat16 by truncation, the devices to nearest even")
    gen = torch.Generator().manual_seed(2)
    # the query slice of a merged q/k/v projection, transposed to [batch, heads, seq, dim] as FusedAttention does
    qkv = torch.randn(batch, seq, heads + 4, dim, generator=gen).to(DEVICE, dtype)
    x = qkv[:, :, :heads].transpose(1, 2)
    angles = torch.rand(batch, seq, dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(DEVICE, dtype), torch.cat([angles.sin()] * 2, -1).to(DEVICE, dtype)
    _equal(rotary(x, cos, sin), rotary_reference(x, cos, sin))
    # cos/sin shared by the batch (batch dim 1)
    _equal(rotary(x, cos[:1], sin[:1]), rotary_reference(x, cos[:1].expand_as(cos), sin[:1].expand_as(sin)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("half,scaling", [(64, 1.0), (40, 1.0), (8, 1.2079)])
def test_rope_angles_match_the_reference(dtype: torch.dtype, half: int, scaling: float) -> None:
    """Bit-equal on a device (cosf / sinf, as PyTorch's kernels); within an fp32 ulp before rounding under the
    interpreter, whose cos and sin are numpy's. Positions up to 2**20, frequencies of a 10000-base RoPE."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the interpreter rounds bfloat16 by truncation, the devices to nearest even")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 2 * half, 2, dtype=torch.float32) / (2 * half)))
    positions = torch.tensor([[0, 1, 2, 31], [1000, 4095, 65535, 1 << 20], [7, 8, 9, 10]])
    got = rope_angles(positions.to(DEVICE), inv_freq.to(DEVICE), scaling, dtype)
    want = rope_angles_reference(positions.to(DEVICE), inv_freq.to(DEVICE), scaling, dtype)
    for g, w in zip(got, want):
        assert g.shape == (3, 4, 2 * half)
        if INTERPRET:
            assert (g.float() - w.float()).abs().max().item() <= 2 * ULP[dtype] * scaling
        else:
            _equal(g, w)
    one_row = rope_angles(positions[:1, :1].to(DEVICE), inv_freq.to(DEVICE), scaling, dtype)  # a decode step
    assert torch.equal(one_row[0], got[0][:1, :1]) and torch.equal(one_row[1], got[1][:1, :1])


def test_rope_angles_reject_bad_operands() -> None:
    positions, inv_freq = torch.zeros(1, 1, dtype=torch.long, device=DEVICE), torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="integer positions"):
        rope_angles(positions.float(), inv_freq, 1.0, torch.float16)
    with pytest.raises(ValueError, match="float32 inverse frequencies"):
        rope_angles(positions, inv_freq.half(), 1.0, torch.float16)
    with pytest.raises(ValueError, match="float32 inverse frequencies"):
        rope_angles(positions, inv_freq.view(2, 2), 1.0, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32000, 1000, 4097, 70001])
def test_next_greedy_inputs_match_argmax_and_the_updates(dtype: torch.dtype, vocab: int) -> None:
    """Each row's token is torch.argmax's (the first of equal maxima, within a step of the loop and, for 70001,
    across its three steps; a row of -inf gives 0), positions move on by one, the key at `length` turns visible,
    the slot becomes length; copy_to receives the logits bit for bit."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not emulate bf16 arithmetic")
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab)).to(DEVICE, dtype)
    logits[1, [vocab - 1, 7, vocab // 2]] = 40.0  # ties: the first index wins
    logits[2, [3, 4]] = 40.0
    logits[3] = float("-inf")
    wide = torch.zeros(4, 1, vocab + 5, device=DEVICE, dtype=dtype)
    wide[:, 0, :vocab] = logits  # the step's logits [B, 1, V] as a view of a wider buffer
    inputs = (torch.zeros(4, 1, dtype=torch.long, device=DEVICE),
              torch.arange(4, device=DEVICE).view(4, 1) + 10,
              torch.rand(4, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.5,
              torch.tensor([36], device=DEVICE))
    want = [t.clone() for t in inputs]
    next_greedy_inputs_reference(logits, *want, 37)
    copied = torch.full((4, 1, vocab + 3), 7.0, device=DEVICE, dtype=dtype)
    next_greedy_inputs(wide[:, -1, :vocab], *inputs, 37, copy_to=copied[:, -1, :vocab])
    for got, expected in zip(inputs, want):
        _equal(got, expected)
    assert torch.equal(copied[:, 0, :vocab], logits) and bool((copied[:, 0, vocab:] == 7.0).all())
    assert inputs[0][:3, 0].tolist() == [int(logits[0].float().argmax()), 7, 3] and inputs[0][3, 0] == 0


def test_next_greedy_inputs_reject_bad_operands() -> None:
    logits = torch.zeros(2, 100, device=DEVICE)
    ids, positions = torch.zeros(2, 1, dtype=torch.long, device=DEVICE), torch.zeros(2, 1, dtype=torch.long,
                                                                                     device=DEVICE)
    key_ok, slot = torch.zeros(2, 8, dtype=torch.bool, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="0 <= length < S"):
        next_greedy_inputs(logits, ids, positions, key_ok, slot, 8)
    with pytest.raises(ValueError, match="int64 ids"):
        next_greedy_inputs(logits, ids.int(), positions, key_ok, slot, 3)
    with pytest.raises(ValueError, match="contiguous rows"):
        next_greedy_inputs(logits.t().contiguous().t(), ids, positions, key_ok, slot, 3)
    with pytest.raises(ValueError, match="copy_to must be"):
        next_greedy_inputs(logits, ids, positions, key_ok, slot, 3, copy_to=torch.zeros_like(logits).half())
