"""torch.ops.ipex_llm_tf.*: the kernels as custom ops, checked with torch.library.opcheck and under torch.compile.

opcheck verifies each op's registration (schema, fake implementation against the real one, no aliasing). The
compiled forward of a patched tiny model must equal its eager forward to float32 rounding (1e-5 of the largest): on the
CPU it traces the kernels' plain torch forms, on accelerators the ops, which run the very dispatch eager code uses.
"""
from __future__ import annotations

import pytest
import torch

import ipex_llm_tf
from ipex_llm_tf.formats import get_format
from ipex_llm_tf.kernels import ops
from model_factories import tiny_model


@pytest.mark.parametrize("low_bit", ["sym_int4", "asym_int5", "sym_int8", "nf4", "fp8_e4m3", "bf16"])
def test_low_bit_linear_op_registration(low_bit: str) -> None:
    gen = torch.Generator().manual_seed(0)
    parts = get_format(low_bit).quantize(torch.randn(48, 128, generator=gen))
    names = ",".join(parts)
    for rows in (1, 64):  # the packed int4 kernel and the dequantize + GEMM path
        x = torch.randn(rows, 128, generator=gen)
        # torch's schema checker re-runs ops on float8 tensors with kernels the CPU lacks ("mul" for Float8_e4m3fn),
        # whatever the op; the other checks (fake tensors, autograd registration, AOT dispatch) still run for fp8
        skip = ("test_schema",) if low_bit.startswith("fp8") else ()
        checks = [name for name in torch.library._OPCHECK_DEFAULT_UTILS if name not in skip]
        torch.library.opcheck(ops.low_bit_linear_op, (x, list(parts.values()), names, low_bit, 48, torch.randn(48)),
                              test_utils=checks)


def test_fused_ops_registration() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, generator=gen)
    torch.library.opcheck(ops.rms_norm_op, (x, torch.rand(64, generator=gen) + 0.5, 1e-6))
    torch.library.opcheck(ops.silu_and_mul_op, (torch.randn(5, 32, generator=gen),))
    q = torch.randn(1, 4, 3, 16, generator=gen)
    torch.library.opcheck(ops.rotary_op, (q, torch.randn(1, 3, 16, generator=gen), torch.randn(1, 3, 16, generator=gen)))


def _compiled_and_traced(model, ids) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(eager logits, compiled logits, the targets of every node Dynamo traced)."""
    with torch.inference_mode():
        want = model(ids).logits
        got = torch.compile(model.forward)(input_ids=ids).logits
    traced: list[str] = []

    def recording_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(model.forward, backend=recording_backend)(input_ids=ids)
    torch._dynamo.reset()
    return want, got, traced


def test_compiled_cpu_forward_is_plain_torch() -> None:
    """On the CPU a compiled forward traces the kernels' plain torch forms, which Inductor can fuse, and the packed
    int4 matmul as its aten op: no custom op (each is a Python call inside the compiled graph) is left."""
    model = ipex_llm_tf.optimize_model(tiny_model("qwen2", attn_implementation="sdpa"), low_bit="sym_int4")
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    want, got, traced = _compiled_and_traced(model, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert any("_weight_int4pack_mm_for_cpu" in target for target in traced)
    assert not any("ipex_llm_tf." in target for target in traced)


def test_compiled_accelerator_forward_takes_custom_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where kernels cannot be traced (Triton launches on CUDA / XPU) each enters the graph as one custom op; the
    decision is kernels.opaque_under_compile, forced on here so the CPU exercises it. nf4 has no CPU int4 planes,
    so its matmul takes the op too. The op runs the very dispatch eager code uses: logits agree to 1e-5."""
    from ipex_llm_tf import kernels
    monkeypatch.setattr(kernels, "opaque_under_compile", lambda x: torch.compiler.is_compiling())
    model = ipex_llm_tf.optimize_model(tiny_model("qwen2", attn_implementation="sdpa"), low_bit="nf4")
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    want, got, traced = _compiled_and_traced(model, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    for op in ("low_bit_linear", "rms_norm", "rotary", "silu_and_mul"):
        assert any(f"ipex_llm_tf.{op}" in target for target in traced), f"{op} not traced as one op"
