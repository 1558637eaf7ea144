"""Intel XPU through stock PyTorch: runs only where torch.xpu is available, skips cleanly elsewhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipex_llm_tf import LowBitLinear, list_formats
from ipex_llm_tf.bench import peak_memory_mib, synchronize

pytestmark = pytest.mark.skipif(not (hasattr(torch, "xpu") and torch.xpu.is_available()),
                                reason="no Intel XPU device (torch.xpu.is_available() is False)")

# half-precision activations on the device vs the float32 reference on the CPU
TOLERANCE = 2e-2


@pytest.mark.parametrize("fmt", list_formats())
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_low_bit_linear_on_xpu_matches_cpu_reference(fmt: str, rows: int) -> None:
    linear = nn.Linear(256, 96)
    layer = LowBitLinear.from_linear(linear, fmt)
    x = torch.randn(rows, 256)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    moved = layer.to("xpu")
    y = moved(x.to("xpu", torch.float16)).float().cpu()
    synchronize("xpu")
    assert float((y - expected).abs().max() / expected.abs().max()) < TOLERANCE
    assert peak_memory_mib("xpu") > 0


def test_graph_decode_on_xpu_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """IPEX_LLM_TF_XPU_GRAPHS=1: decode steps and prompts recorded as XPU graphs give eager decoding's greedy
    tokens."""
    from model_factories import tiny_model

    import ipex_llm_tf
    from ipex_llm_tf.models.graph_decode import XPU_GRAPHS_ENV, graph_decoder

    if not hasattr(torch.xpu, "XPUGraph"):
        pytest.skip("this PyTorch has no torch.xpu.XPUGraph")
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(0)).to("xpu")

    def generate(model):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                                  do_sample=False, pad_token_id=0)

    eager = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int8",
                                       modules_to_not_convert=["lm_head"]).to("xpu")
    want = generate(eager)
    monkeypatch.setenv(XPU_GRAPHS_ENV, "1")
    model = ipex_llm_tf.optimize_model(tiny_model("llama", attn_implementation="sdpa").half(), low_bit="sym_int8",
                                       modules_to_not_convert=["lm_head"]).to("xpu")
    for _ in range(3):  # the prompt: eager, then recorded and replayed, then replayed (models/prompt_graphs.py)
        assert torch.equal(generate(model), want)
    decoder = graph_decoder(model)
    assert decoder is not None and decoder.stats.captures >= 1 and decoder.stats.replays > 0
    assert decoder.stats.prompt_captures == 1 and decoder.stats.prompt_replays == 2
