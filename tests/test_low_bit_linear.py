"""LowBitLinear: parity with F.linear on the dequantized weight, device moves, state_dict, and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import relative_error
from ipex_llm_tf import FormatError, LowBitLinear, get_format, list_formats
from ipex_llm_tf.kernels import backend_for

ALL_FORMATS = list_formats()
# The CPU fast path computes with bf16 activations (and bf16 scales for the packed int4 kernel): its output is within
# this relative distance (max abs error / max abs value) of the float32 reference. The reference backend is exact
# up to float32 summation order.
FAST_PATH_TOLERANCE = 2e-2
REFERENCE_TOLERANCE = 1e-5


def make_linear(in_features: int = 256, out_features: int = 128, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_(0, 0.5)
    return layer


def expected_output(layer: LowBitLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), layer.dequantized_weight(torch.float32), None if layer.bias is None else layer.bias.float())


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(3, 256), (2, 5, 256), (1, 1, 1, 256), (80, 256)])
def test_forward_matches_dequantized_linear(fmt: str, shape: tuple[int, ...]) -> None:
    layer = LowBitLinear.from_linear(make_linear(), fmt)
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 128) and y.dtype == x.dtype
    assert relative_error(y, expected_output(layer, x)) < FAST_PATH_TOLERANCE


@pytest.mark.parametrize("fmt", ["sym_int4", "asym_int5", "nf4", "fp8_e4m3", "bf16"])
def test_reference_backend_is_exact(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    layer = LowBitLinear.from_linear(make_linear(), fmt)
    x = torch.randn(4, 256)
    assert relative_error(layer(x), expected_output(layer, x)) < REFERENCE_TOLERANCE


@pytest.mark.parametrize("fmt", ["sym_int4", "sym_int8", "asym_int5"])
def test_packed_kernel_used_for_ggml_formats_and_tracks_reference(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = LowBitLinear.from_linear(make_linear(bias=False), fmt)
    x = torch.randn(2, 256)
    fast = layer(x)
    assert layer._packed_cache.value is not None  # the packed int4 path ran
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    assert relative_error(fast, layer(x)) < FAST_PATH_TOLERANCE


def test_input_dtypes() -> None:
    layer = LowBitLinear.from_linear(make_linear(), "sym_int4")
    x = torch.randn(2, 256)
    for dtype in (torch.bfloat16, torch.float16):
        assert layer(x.to(dtype)).dtype == dtype
    assert relative_error(layer(x.bfloat16()).float(), expected_output(layer, x)) < FAST_PATH_TOLERANCE


def test_without_bias_and_odd_out_features() -> None:
    # out_features=40 is not a multiple of 16, so the packed int4 kernel cannot run and the fallback must
    layer = LowBitLinear.from_linear(make_linear(64, 40, bias=False), "sym_int4")
    x = torch.randn(3, 64)
    assert layer.bias is None
    assert relative_error(layer(x), expected_output(layer, x)) < FAST_PATH_TOLERANCE


@pytest.mark.parametrize("fmt", ["sym_int4", "nf3", "fp6", "fp8_e5m2"])
def test_state_dict_round_trip(fmt: str) -> None:
    source = LowBitLinear.from_linear(make_linear(), fmt)
    state = source.state_dict()
    assert set(state) == set(source.parts) | {"bias"}
    target = LowBitLinear(256, 128, fmt, bias=True)
    target.load_state_dict(state)
    for name, tensor in source.parts.items():
        assert torch.equal(target.parts[name].view(torch.uint8), tensor.view(torch.uint8))
    x = torch.randn(2, 256)
    assert torch.equal(target(x), source(x))


def test_to_moves_packed_data_as_is() -> None:
    layer = LowBitLinear.from_linear(make_linear(), "asym_int4")
    before = {k: v.clone() for k, v in layer.parts.items()}
    layer.to(torch.device("cpu")).to(dtype=torch.bfloat16)  # dtype casts must not touch packed integer buffers
    for name, tensor in layer.parts.items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name])
    moved = layer.to("meta")
    assert all(t.device.type == "meta" for t in moved.parts.values())


def test_packed_cache_rebuilt_after_load() -> None:
    layer = LowBitLinear.from_linear(make_linear(bias=False), "sym_int4")
    x = torch.randn(1, 256)
    first = layer(x)
    other = LowBitLinear.from_linear(make_linear(bias=False), "sym_int4")
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), first)


def test_backend_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend_for(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    assert backend_for(torch.device("cpu")) == "torch"
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="not a backend"):
        backend_for(torch.device("cpu"))
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "triton")
    with pytest.raises(ValueError, match="CUDA or XPU"):
        backend_for(torch.device("cpu"))


def test_bad_inputs_name_the_module() -> None:
    with pytest.raises(ValueError, match="unknown low-bit format 'int3'.*sym_int4"):
        LowBitLinear.from_linear(make_linear(), "int3")
    bad = make_linear()
    with torch.no_grad():
        bad.weight[3, 7] = float("nan")
    with pytest.raises(FormatError, match="model.layers.0.q_proj.*NaN"):
        LowBitLinear.from_linear(bad, "sym_int4", name="model.layers.0.q_proj")
    with torch.no_grad():
        bad.weight[3, 7] = float("inf")
    with pytest.raises(FormatError, match="Inf"):
        LowBitLinear.from_linear(bad, "nf4", name="x")
    with pytest.raises(FormatError, match="block size"):
        LowBitLinear.from_linear(make_linear(100, 32), "sym_int4", name="head")
    with pytest.raises(FormatError, match="dtype"):
        LowBitLinear.from_linear(make_linear().to(torch.float64), "sym_int4")
    with pytest.raises(FormatError, match="empty"):
        LowBitLinear(0, 32, "sym_int4")
    layer = LowBitLinear.from_linear(make_linear(), "sym_int4")
    with pytest.raises(ValueError, match="last dim 256"):
        layer(torch.randn(2, 255))


@pytest.mark.parametrize("fmt", ["sym_int8", "asym_int4", "nf4", "fp8_e4m3", "bf16"])
def test_low_bit_embedding_lookup_equals_dequantized_table(fmt: str) -> None:
    from ipex_llm_tf.low_bit_linear import LowBitEmbedding
    table = torch.randn(50, 64)
    embedding = LowBitEmbedding(50, 64, fmt)
    embedding.load_parts(get_format(fmt).quantize(table))
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert torch.equal(embedding(ids), F.embedding(ids, embedding.dequantized_weight()))
    embedding.to(torch.bfloat16)
    assert embedding(ids).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expects tensors"):
        embedding.load_parts({"bogus": table})


@pytest.mark.parametrize("fmt", ["sym_int4", "asym_int5", "sym_int8"])
def test_int4_planes_packed_in_row_chunks_equal_whole(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipex_llm_tf.kernels import cpu_int4
    layer = LowBitLinear.from_linear(make_linear(64, 144, bias=False), fmt)  # two full chunks and a tail
    whole = cpu_int4.pack_planes(layer.fmt, layer.parts)
    monkeypatch.setattr(cpu_int4, "ROW_CHUNK", 64)
    chunked = cpu_int4.pack_planes(layer.fmt, layer.parts)
    assert len(whole) == len(chunked)
    for (packed_a, sz_a), (packed_b, sz_b) in zip(whole, chunked):
        assert torch.equal(packed_a, packed_b) and torch.equal(sz_a, sz_b)
