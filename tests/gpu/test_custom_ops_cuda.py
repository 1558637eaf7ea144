"""The custom ops on a CUDA device: opcheck of the Triton-backed registrations and a compiled forward.

The compiled forward of a patched tiny Llama (fp16, sym_int4) must give the eager forward's greedy argmax and logits
within 1e-2 of the largest (fp16; the same kernels run in both, but Inductor fuses the glue ops around them).
"""
from __future__ import annotations

import pytest
import torch

from model_factories import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
pytest.importorskip("triton")

import ipex_llm_tf  # noqa: E402
from ipex_llm_tf.formats import get_format  # noqa: E402
from ipex_llm_tf.kernels import ops  # noqa: E402


@pytest.mark.parametrize("low_bit", ["sym_int4", "sym_int8", "fp8_e4m3"])
def test_low_bit_linear_op_on_cuda(low_bit: str) -> None:
    parts = {name: t.cuda() for name, t in get_format(low_bit).quantize(torch.randn(96, 256)).items()}
    for rows in (1, 40):  # the GEMV and the fused-matmul kernels
        x = torch.randn(rows, 256, device="cuda", dtype=torch.float16)
        torch.library.opcheck(ops.low_bit_linear_op, (x, list(parts.values()), ",".join(parts), low_bit, 96, None),
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiled_forward_on_cuda() -> None:
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int4")
    model = model.to("cuda")
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.inference_mode():
        want = model(input_ids=ids).logits.float()
        got = torch.compile(model.forward)(input_ids=ids).logits.float()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
