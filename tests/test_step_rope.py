"""models.step_rope: which rotary embeddings take the one-kernel RoPE angles in a graph decode step, and the
reference formula against transformers' own rotary embeddings (bit for bit on the CPU)."""
from __future__ import annotations

import pytest
import torch

from model_factories import ARCHITECTURES, tiny_model

from ipex_llm_tf import kernels
from ipex_llm_tf.kernels.reference import rope_angles_reference
from ipex_llm_tf.models import step_rope
from ipex_llm_tf.models.step_rope import StepRope, fixed_frequencies

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def _rotary(arch: str = "llama", scaling: dict | None = None) -> torch.nn.Module:
    overrides = {} if scaling is None else {"rope_scaling": scaling}
    return tiny_model(arch, **overrides).model.rotary_emb


POSITIONS = torch.tensor([[0, 1, 2, 17, 255], [3, 1000, 4095, 65535, 123456]])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_equals_each_architectures_rotary_embedding(arch: str, dtype: torch.dtype) -> None:
    rotary = _rotary(arch)
    inv_freq, scaling = fixed_frequencies(rotary)
    want = rotary(torch.zeros(1, dtype=dtype), POSITIONS)
    got = rope_angles_reference(POSITIONS, inv_freq, scaling, dtype)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("kind", ["linear", "llama3", "yarn"])
def test_scaled_rope_types_have_fixed_frequencies_and_the_same_values(kind: str) -> None:
    rotary = _rotary("llama", SCALINGS[kind])
    inv_freq, scaling = fixed_frequencies(rotary)
    assert scaling == pytest.approx(rotary.attention_scaling)
    want = rotary(torch.zeros(1, dtype=torch.float16), POSITIONS)
    for g, w in zip(rope_angles_reference(POSITIONS, inv_freq, scaling, torch.float16), want):
        assert torch.equal(g, w)


def test_dynamic_rope_types_keep_the_embedding() -> None:
    rotary = _rotary("llama", {"rope_type": "dynamic", "factor": 2.0})
    assert fixed_frequencies(rotary) is None
    rotary.rope_type = "longrope"
    assert fixed_frequencies(rotary) is None
    assert fixed_frequencies(torch.nn.Linear(2, 2)) is None


def test_step_rope_on_the_cpu_is_the_embedding() -> None:
    rotary = _rotary()
    hidden = torch.zeros(2, 5, 64, dtype=torch.float16)
    for g, w in zip(StepRope(rotary)(hidden, POSITIONS), rotary(hidden, POSITIONS)):
        assert torch.equal(g, w)


def _as_triton(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """Pretend the device runs the Triton op (the reference stands in for the kernel, counting its calls)."""
    monkeypatch.setattr(kernels, "op_backend", lambda op, device: "triton")

    def angles(*args):
        calls.append(args)
        return rope_angles_reference(*args)
    monkeypatch.setattr(kernels, "rope_angles", angles)


def test_step_rope_takes_the_kernel_once_it_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _as_triton(monkeypatch, calls)
    rotary = _rotary()
    rope = StepRope(rotary)
    hidden = torch.zeros(2, 1, 64, dtype=torch.float16)
    positions = POSITIONS[:, :1]
    for _ in range(2):
        for g, w in zip(rope(hidden, positions), rotary(hidden, positions)):
            assert torch.equal(g, w)
    assert rope.agrees == {(hidden.device, torch.float16): True}
    assert len(calls) == 3, "one check, then one call a step"
    assert calls[0][0].tolist() == [list(step_rope._CHECK_POSITIONS)]


def test_step_rope_keeps_an_embedding_that_computes_something_else(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _as_triton(monkeypatch, calls)
    rotary = _rotary()
    original = type(rotary).forward

    def shifted(self, x, position_ids):  # a rotary variant with the same attributes and other values
        cos, sin = original(self, x, position_ids + 1)
        return cos, sin
    monkeypatch.setattr(type(rotary), "forward", shifted)
    rope = StepRope(rotary)
    hidden = torch.zeros(1, 1, 64, dtype=torch.float32)
    got = rope(hidden, POSITIONS[:1, :1])
    want = rotary(hidden, POSITIONS[:1, :1])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert rope.agrees == {(hidden.device, torch.float32): False}
    assert len(calls) == 1, "only the check ran the kernel"
