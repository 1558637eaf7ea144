"""The optional ipex backend: parity of each ipex-backed op with the reference (skipped without ipex), and, everywhere,
that the dispatch never imports ipex unless it is installed and chosen, and that choosing it without ipex is a clear
error.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import relative_error
from model_factories import step_logits, tiny_model

from ipex_llm_tf import kernels
from ipex_llm_tf.kernels import ipex_ops
from ipex_llm_tf.kernels.reference import (
    rms_norm_reference,
    rotary_reference,
    silu_and_mul_reference,
)
from ipex_llm_tf.models import optimize_architecture

# Tolerances, relative to the largest reference value. float32: ipex sums in another order (measured <= 1.2e-6
# absolute on unit-scale outputs). bf16 / fp16: ipex rounds once where the reference rounds twice (the normalised
# value, then the product), so results may differ by one unit in the last place: 2^-8 (bf16), 2^-11 (fp16) relative.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
DTYPES = list(TOLERANCE)


@pytest.fixture
def ipex_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("intel_extension_for_pytorch", reason="intel-extension-for-pytorch is not installed")
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "ipex")


def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [batch, seq, head_dim] as transformers builds them: cat(freqs, freqs), so both halves repeat."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# -- parity (needs ipex) --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 64), (3, 130)])
def test_rms_norm_matches_reference(ipex_backend: None, dtype: torch.dtype, shape: tuple) -> None:
    x = (torch.randn(shape) * 4).to(dtype)
    weight = (torch.rand(shape[-1]) + 0.5).to(dtype)
    assert kernels.op_backend("rms_norm", x.device) == "ipex"
    actual, expected = kernels.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert relative_error(actual, expected) <= TOLERANCE[dtype]


def test_rms_norm_on_a_strided_view(ipex_backend: None) -> None:
    # Qwen3's q/k norms see a per-head slice of the merged qkv output
    qkv = torch.randn(2, 5, 8, 16)
    view, weight = qkv[:, :, :4], torch.rand(16) + 0.5
    assert not view.is_contiguous()
    assert relative_error(kernels.rms_norm(view, weight, 1e-6), rms_norm_reference(view, weight, 1e-6)) <= 1e-5


def test_rms_norm_with_mixed_dtypes_keeps_the_reference(ipex_backend: None) -> None:
    # ipex would return bf16 where transformers promotes bf16 * fp32 to fp32: such calls stay on the reference
    x, weight = torch.randn(3, 64).to(torch.bfloat16), torch.rand(64) + 0.5
    assert torch.equal(kernels.rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (2, 1), (2, 9)])
def test_rotary_matches_reference(ipex_backend: None, dtype: torch.dtype, batch: int, seq: int) -> None:
    heads, head_dim = 4, 32
    # left padding gives each sequence its own positions, so the tables differ per batch row
    positions = torch.arange(seq)[None] + torch.tensor([[40], [3]])[:batch]
    cos, sin = rope_tables(positions, head_dim, dtype)
    qkv = torch.randn(batch, seq, 2 * heads, head_dim).to(dtype)
    x = qkv[:, :, :heads].transpose(1, 2)  # the strided [batch, heads, seq, dim] view FusedAttention passes
    before = qkv.clone()
    actual, expected = kernels.rotary(x, cos, sin), rotary_reference(x, cos, sin)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert relative_error(actual, expected) <= TOLERANCE[dtype]
    assert torch.equal(qkv, before), "ipex writes into its inputs; the wrapper must hand it a copy"


def test_rotary_on_a_contiguous_input_leaves_it_alone(ipex_backend: None) -> None:
    x = torch.randn(1, 2, 3, 16).transpose(1, 2).contiguous().transpose(1, 2)  # [b, s, h, d] storage: reshape views it
    cos, sin = rope_tables(torch.arange(3)[None], 16, torch.float32)
    before = x.clone()
    assert relative_error(kernels.rotary(x, cos, sin), rotary_reference(x, cos, sin)) <= 1e-5
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(ipex_backend: None, dtype: torch.dtype) -> None:
    gate_up = torch.randn(2, 3, 2 * 96).to(dtype)
    actual, expected = kernels.silu_and_mul(gate_up), silu_and_mul_reference(gate_up)
    # silu(g) rounded to bf16 before the product in the reference, once at the end in ipex's compiled kernel
    assert actual.dtype == expected.dtype and relative_error(actual, expected) <= 2 * TOLERANCE[dtype]


# Prefill 12 tokens (longer than the sliding window of 8), a 3-token chunk through the cache, then decode steps
CHUNKS = [12, 3] + [1] * 6
MODEL_CASES = [("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}),
               ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1})]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(("arch", "overrides"), MODEL_CASES, ids=["llama", "mistral", "qwen2", "qwen3", "qwen2-sliding"])
def test_fused_model_on_ipex_matches_transformers(ipex_backend: None, arch: str, overrides: dict,
                                                  attn_implementation: str) -> None:
    torch.set_num_threads(1)  # tiny matmuls: extra threads only wait for each other on a shared machine
    reference = tiny_model(arch, attn_implementation=attn_implementation, **overrides)
    fused = copy.deepcopy(reference)
    assert optimize_architecture(fused) is True
    ids = torch.randint(2, 128, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(1))
    for step, (actual, expected) in enumerate(zip(step_logits(fused, ids, CHUNKS), step_logits(reference, ids, CHUNKS))):
        assert (actual - expected).abs().max() <= 1e-4, f"step {step}"


def test_bf16_model_on_ipex_is_as_close_to_fp32_as_transformers_bf16(ipex_backend: None) -> None:
    # ipex rounds bf16 less often than transformers does, so the fair yardstick is the float32 model: measured on
    # three seeds, ipex's bf16 logits are 0.9-1.15x as far from it as transformers' own bf16 forward (ours 0.7-1.3x)
    truth_model = tiny_model("qwen3")
    reference = copy.deepcopy(truth_model).to(torch.bfloat16)
    fused = copy.deepcopy(reference)
    assert optimize_architecture(fused) is True
    ids = torch.randint(2, 128, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(2))
    truth = step_logits(truth_model, ids, CHUNKS)
    ours = max(relative_error(a, t) for a, t in zip(step_logits(fused, ids, CHUNKS), truth))
    theirs = max(relative_error(a, t) for a, t in zip(step_logits(reference, ids, CHUNKS), truth))
    assert ours <= 1.5 * theirs


# -- dispatch, with or without ipex ---------------------------------------------------------------------------------

IMPORT_PROBE = textwrap.dedent("""
    import sys
    import torch
    from ipex_llm_tf.kernels import ipex_ops
    if sys.argv[1] == "hide":  # what a machine without ipex sees, even where it is installed
        ipex_ops.installed = lambda: False
    from ipex_llm_tf.models import optimize_architecture
    sys.path.insert(0, "tests")
    from model_factories import tiny_model
    model = tiny_model("qwen3")
    optimize_architecture(model)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    print("imported" if "intel_extension_for_pytorch" in sys.modules else "not imported")
""")


# auto with ipex absent (hidden where it is installed), and the backends that never choose it, ipex present or not
@pytest.mark.parametrize(("backend", "hide"), [("auto", "hide"), ("cpu", "keep"), ("torch", "keep")])
def test_dispatch_never_imports_ipex_unless_installed_and_chosen(backend: str, hide: str) -> None:
    env = {**os.environ, "IPEX_LLM_TF_BACKEND": backend}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, hide], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "not imported"


def test_ipex_is_not_imported_with_the_package() -> None:
    out = subprocess.run([sys.executable, "-c", ("import sys, ipex_llm_tf, ipex_llm_tf.kernels, ipex_llm_tf.models; "
                          "print('intel_extension_for_pytorch' in sys.modules)")], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_choosing_ipex_without_it_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipex_ops, "installed", lambda: False)
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "ipex")
    monkeypatch.setattr(kernels, "_OP_BACKENDS", {})  # choices made under the real ipex_ops are cached
    x, weight = torch.randn(2, 8), torch.ones(8)
    for call in (lambda: kernels.rms_norm(x, weight, 1e-6), lambda: kernels.backend_for(torch.device("cpu"))):
        with pytest.raises(ipex_ops.IpexUnavailableError, match="intel-extension-for-pytorch.*not installed"):
            call()
    # an ImportError to Python, and a ValueError like every other bad IPEX_LLM_TF_BACKEND (one line in the CLI)
    assert issubclass(ipex_ops.IpexUnavailableError, ImportError)
    assert issubclass(ipex_ops.IpexUnavailableError, ValueError)
    assert any("not installed" in line for line in kernels.describe_op_backends(torch.device("cpu")))


def test_auto_falls_back_when_an_installed_ipex_does_not_import(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise ipex_ops.IpexUnavailableError("ipex 2.8 needs torch 2.8")

    monkeypatch.delenv("IPEX_LLM_TF_BACKEND", raising=False)
    monkeypatch.setattr(ipex_ops, "installed", lambda: True)
    monkeypatch.setattr(ipex_ops, "functional", broken)
    monkeypatch.setattr(kernels, "_ipex_broken", [])
    monkeypatch.setattr(kernels, "_OP_BACKENDS", {})  # choices made under the real ipex_ops are cached
    x, weight = torch.randn(2, 8), torch.rand(8)
    assert torch.equal(kernels.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    assert kernels.op_backend("rms_norm", x.device) == "torch"
    assert "not using ipex ops" in caplog.text


def test_auto_uses_ipex_only_for_ops_it_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IPEX_LLM_TF_BACKEND", raising=False)
    monkeypatch.setattr(ipex_ops, "installed", lambda: True)
    monkeypatch.setattr(ipex_ops, "functional", lambda: None)
    monkeypatch.setattr(kernels, "_ipex_broken", [])
    monkeypatch.setattr(kernels, "_OP_BACKENDS", {})  # choices made under the real ipex_ops are cached
    cpu = torch.device("cpu")
    chosen = {op for op in ipex_ops.OPS if kernels.op_backend(op, cpu) == "ipex"}
    assert chosen == set(kernels.AUTO_IPEX_OPS["cpu"])
    assert kernels.op_backend("rms_norm", torch.device("cuda")) != "ipex"  # ipex has no CUDA ops (Triton or ours)
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "cpu")
    assert all(kernels.op_backend(op, cpu) == "torch" for op in ipex_ops.OPS)
    lines = kernels.describe_op_backends(cpu)
    assert len(lines) == len(ipex_ops.OPS) and all("IPEX_LLM_TF_BACKEND=cpu" in line for line in lines)
