"""The codebook kernels' byte table (CPU): entry b packs the float32 bits of both nibbles' values of byte b."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from ipex_llm_tf.formats import get_format  # noqa: E402
from ipex_llm_tf.kernels.triton_operands import byte_pair_table  # noqa: E402


@pytest.mark.parametrize("fmt_name", ["nf4", "fp4"])
def test_entries_hold_both_nibbles_bit_exactly(fmt_name: str) -> None:
    values = get_format(fmt_name).values.to(torch.float32)
    table = byte_pair_table(values)
    assert table.dtype == torch.int64 and table.shape == (256,)
    low = (table & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    high = (table >> 32).to(torch.int32).view(torch.float32)
    b = torch.arange(256)
    assert torch.equal(low.view(torch.int32), values[b & 15].view(torch.int32))
    assert torch.equal(high.view(torch.int32), values[b >> 4].view(torch.int32))
