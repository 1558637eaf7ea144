"""The CPU decode fast paths: torch_fast ops equal the reference bit for bit; LowBitLinear's shortcut equals dispatch."""
from __future__ import annotations

import pytest
import torch

from ipex_llm_tf import kernels
from ipex_llm_tf.kernels import torch_fast
from ipex_llm_tf.kernels.reference import rms_norm_reference, rotary_reference
from ipex_llm_tf.low_bit_linear import LowBitLinear


@pytest.mark.parametrize("shape", [(1, 12, 1, 64), (2, 4, 7, 32), (1, 3, 5, 6), (3, 2, 1, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_reference_bit_for_bit(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    batch, _, seq, dim = shape
    x = torch.randn(shape, dtype=dtype)
    cos, sin = torch.randn(batch, seq, dim, dtype=dtype), torch.randn(batch, seq, dim, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(torch_fast.rotary(x, cos, sin), rotary_reference(x, cos, sin))
        # a second tensor of new values must not reuse the first one's signed sin
        sin2 = torch.randn_like(sin)
        assert torch.equal(torch_fast.rotary(x, cos, sin2), rotary_reference(x, cos, sin2))


def test_rotary_keeps_autograd_working() -> None:
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    torch_fast.rotary(x, cos, sin).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_equals_reference_bit_for_bit(dtype: torch.dtype) -> None:
    x, weight = torch.randn(3, 5, 96, dtype=dtype), torch.rand(96, dtype=dtype)
    assert torch.equal(torch_fast.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


@pytest.mark.parametrize("fmt", ["asym_int4", "sym_int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_shortcut_equals_general_dispatch(fmt: str, bias: bool) -> None:
    linear = torch.nn.Linear(64, 48, bias=bias)
    layer = LowBitLinear.from_linear(linear, fmt)
    x = torch.randn(2, 3, 64)
    first = layer(x)  # builds the int4 planes through the general path
    assert layer._packed_cache.cpu_planes is not None
    again = layer(x)  # the shortcut
    assert again.shape == (2, 3, 48) and again.dtype == x.dtype
    assert torch.equal(first, again)


def test_cpu_shortcut_follows_a_backend_change(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = LowBitLinear.from_linear(torch.nn.Linear(64, 32), "sym_int4")
    x = torch.randn(1, 64)
    layer(x)
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    exact = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.equal(layer(x), exact)  # the float32 reference, not the bf16 int4 kernel
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="not a backend"):
        layer(x)


def test_cpu_shortcut_leaves_prefill_sized_inputs_to_the_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = LowBitLinear.from_linear(torch.nn.Linear(64, 32, bias=False), "sym_int4")
    layer(torch.randn(1, 64))
    calls = []
    real = kernels.cpu_int4_linear
    monkeypatch.setattr("ipex_llm_tf.low_bit_linear.cpu_int4_linear", lambda *a: calls.append(1) or real(*a))
    layer(torch.randn(kernels.CPU_GEMM_MIN_ROWS, 64))
    assert not calls
    layer(torch.randn(2, 64))
    assert calls


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_rotary_and_write_kv_on_the_cpu_is_rotary_then_the_write(heads: int, kv_heads: int) -> None:
    """The op a graph step calls: RoPE on the token's query and key heads, its key and value written at the slot."""
    dim, slot = 16, torch.tensor([5])
    qkv = torch.randn(2, 1, heads + 2 * kv_heads + 1, dim)[:, :, :heads + 2 * kv_heads]  # a view, as in a step
    cos, sin = torch.randn(2, 1, dim), torch.randn(2, 1, dim)
    keys, values = torch.randn(2, kv_heads, 8, dim), torch.randn(2, kv_heads, 8, dim)
    want_keys, want_values = keys.clone(), values.clone()
    with torch.no_grad():
        query = kernels.rotary_and_write_kv(qkv, cos, sin, heads, kv_heads, keys, values, slot)
        rotated = rotary_reference(qkv[:, :, :heads + kv_heads].transpose(1, 2), cos, sin)
    want_keys.index_copy_(2, slot, rotated[:, heads:])
    want_values.index_copy_(2, slot, qkv[:, :, heads + kv_heads:].transpose(1, 2))
    assert torch.equal(query, rotated[:, :heads])
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


def test_rotary_decode_attention_on_the_cpu_is_rotary_write_then_sdpa() -> None:
    """The fused step op off Triton: the rotated key and the value written at the slot, and the rotated query's
    attention over the written planes, as SDPA with the mask computes it."""
    heads, kv_heads, dim, slot = 6, 2, 16, torch.tensor([5])
    qkv = torch.randn(2, 1, heads + 2 * kv_heads, dim)
    cos, sin = torch.randn(2, 1, dim), torch.randn(2, 1, dim)
    keys, values = torch.randn(2, kv_heads, 8, dim), torch.randn(2, kv_heads, 8, dim)
    key_ok = torch.rand(2, 8) > 0.3
    key_ok[:, 5] = True
    with torch.no_grad():
        out = kernels.rotary_decode_attention(qkv, cos, sin, heads, kv_heads, keys, values, slot, key_ok, 0.25)
        rotated = rotary_reference(qkv[:, :, :heads + kv_heads].transpose(1, 2), cos, sin)
        assert torch.equal(keys[:, :, 5:6], rotated[:, heads:])
        assert torch.equal(values[:, :, 5], qkv[:, 0, heads + kv_heads:])
        want = torch.nn.functional.scaled_dot_product_attention(
            rotated[:, :heads], keys.repeat_interleave(3, dim=1), values.repeat_interleave(3, dim=1),
            attn_mask=key_ok[:, None, None, :], scale=0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_rotary_and_append_kv_on_the_cpu_is_rotary_then_the_copies() -> None:
    """A prompt's op off Triton: RoPE on its query and key heads, its keys and values copied to slots 3..7."""
    heads, kv_heads, dim, tokens = 6, 2, 16, 5
    qkv = torch.randn(2, tokens, heads + 2 * kv_heads + 1, dim)[:, :, :heads + 2 * kv_heads]
    cos, sin = torch.randn(1, tokens, dim), torch.randn(1, tokens, dim)
    keys, values = torch.randn(2, kv_heads, 12, dim), torch.randn(2, kv_heads, 12, dim)
    want_keys, want_values = keys.clone(), values.clone()
    with torch.no_grad():
        query = kernels.rotary_and_append_kv(qkv, cos, sin, heads, kv_heads, keys, values, 3)
        rotated = rotary_reference(qkv[:, :, :heads + kv_heads].transpose(1, 2), cos, sin)
    want_keys[:, :, 3:8] = rotated[:, heads:]
    want_values[:, :, 3:8] = qkv[:, :, heads + kv_heads:].transpose(1, 2)
    assert torch.equal(query, rotated[:, :heads])
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
