"""torch.ops.ipex_llm_tf.*: the kernels as custom ops, checked with torch.library.opcheck and under torch.compile.

opcheck verifies each op's registration (schema, fake implementation against the real one, no aliasing). The
compiled forward of a patched tiny Llama must equal its eager forward: the ops run the very dispatch eager code
uses, so logits agree to float32 rounding (1e-5 of the largest).
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


def test_compiled_forward_equals_eager() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("qwen2", attn_implementation="sdpa"), low_bit="sym_int4")
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model(ids).logits
    compiled = torch.compile(model.forward)
    with torch.inference_mode():
        got = compiled(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    traced: list[str] = []

    def recording_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(model.forward, backend=recording_backend)(input_ids=ids)
    for op in ("low_bit_linear", "rms_norm", "rotary", "silu_and_mul"):
        assert any(f"ipex_llm_tf.{op}" in target for target in traced), f"{op} not traced as one op"
