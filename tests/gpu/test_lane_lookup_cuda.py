"""Warp-shuffle table lookups (kernels/lane_lookup.py; CUDA only, so skipped elsewhere and in the interpreter).

lane_lookup itself: every code's value bit for bit equal to the table's, for 8- and 16-entry tables, with the bits
above a code's low ones set at random (the shuffle must ignore them). The GEMVs that use it (nf4's words kernel,
nf3's two-plane kernel) against the same GEMVs with table loads (IPEX_LLM_TF_LANE_LOOKUP=0): nf4 bit for bit (the
same values added in the same order); nf3 within four fp16 rounding steps of the largest output, as its table
path loads pairs through a layout of its own and Triton may sum a scale group's four words in another order there.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_INTERPRET, relative_error, triton_device

DEVICE = triton_device()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE != "cuda" or TRITON_INTERPRET, reason="warp-shuffle lookups are CUDA-only")]
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from ipex_llm_tf.formats import get_format  # noqa: E402
from ipex_llm_tf.kernels import lane_lookup as LL  # noqa: E402
from ipex_llm_tf.kernels import triton_linear as TL  # noqa: E402
from ipex_llm_tf.kernels.lane_lookup import lane_lookup, lane_table  # noqa: E402


@triton.jit
def _lookup_kernel(tab_ptr, codes_ptr, out_ptr, ENTRIES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, lane_lookup(lane_table(tab_ptr, ENTRIES), tl.load(codes_ptr + offs), ENTRIES))


@pytest.mark.parametrize("entries", [8, 16])
@pytest.mark.parametrize("warps", [1, 4])
def test_lane_lookup_returns_the_table_values(entries: int, warps: int) -> None:
    """lane_lookup(lane_table(t), c) == t[c % entries], bit for bit, over 4096 random codes."""
    table = torch.randn(entries, device=DEVICE)
    codes = torch.randint(-2 ** 31, 2 ** 31 - 1, (4096,), dtype=torch.int32, device=DEVICE)
    out = torch.empty(4096, device=DEVICE)
    _lookup_kernel[(4096 // 512,)](table, codes, out, ENTRIES=entries, BLOCK=512, num_warps=warps)
    expected = table[(codes & (entries - 1)).long()]
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("fmt_name", ["nf4", "nf3"])
def test_lane_lookups_match_table_loads(fmt_name: str, gated: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GEMVs with shuffled lookups (CUDA's default) against their table loads: tiles of one, two, four and eight
    warps, one to four activation rows a program (nf4), a partial last step (K = 4160) and an odd N."""
    n, k = 2 * 37, 4160
    fmt = get_format(fmt_name)
    w = torch.randn(n, k, device=DEVICE) * 0.05
    w[0, :32] = 0.0  # an all-zero block (zero scale)
    parts = fmt.quantize(w)
    ref = fmt.dequantize(parts, dtype=torch.float32)
    ops = TL.block_operands(fmt, parts)
    configs = (TL.GemvConfig(16, 64, 2, 1, 2), TL.GemvConfig(8, 128, 4, 1, 2), TL.GemvConfig(16, 256, 8, 1, 1),
               TL.GemvConfig(8, 32, 1, 1, 0))
    if fmt_name == "nf4":  # the two-plane GEMV serves one row a program
        configs += (TL.GemvConfig(16, 64, 2, 1, 2, block_m=2), TL.GemvConfig(8, 32, 4, 1, 1, block_m=4))
    launch = TL.gemv_gated if gated else TL.gemv_blocks
    for cfg in configs:
        x = torch.randn(cfg.block_m + 1, k, device=DEVICE).to(torch.float16)
        monkeypatch.setenv(LL.LANE_LOOKUP_ENV, "0")
        assert not LL.lanes_available(x.device)
        loaded = launch(x, ops, None, n, cfg)
        monkeypatch.setenv(LL.LANE_LOOKUP_ENV, "1")
        assert LL.lanes_available(x.device)
        shuffled = launch(x, ops, None, n, cfg)
        what = f"{fmt_name} gated={gated} {cfg}"
        if fmt_name == "nf4":
            assert torch.equal(shuffled, loaded), what
        else:
            # a few fp16 rounding steps at the largest output (the gated output rounds gate, up and their product).
            # A wrong lookup rule moves outputs by many products; single lookups are held bit for bit by the test above
            bound = 4 * float(loaded.float().abs().max()) * 2.0 ** -10
            assert float((shuffled.float() - loaded.float()).abs().max()) <= bound, what
        if not gated:
            err = relative_error(shuffled.float(), F.linear(x.float(), ref))
            assert err < 1e-2, f"{what}: relative error {err:.2e} against the dequantized weight"
