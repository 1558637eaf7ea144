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
