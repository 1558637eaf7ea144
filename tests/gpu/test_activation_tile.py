"""The decode GEMVs' activations read as one tile a step (X_TILE, kernels/triton_gemv_tiles.load_x_tile) against
their vector loads: the words kernel (8 a step) gives the same bits, the same values reaching the same multiply-adds
in the same order; the two-plane kernel (nf3 16 a step, fp6 8) the same bits in the interpreter and, on a GPU,
within four fp16 steps of the largest output (Triton may add a scale group's four words in another order in another
layout, as tests/gpu/test_lane_lookup_cuda.py found for nf3). Runs on a GPU as launched there (nf4 and nf3 with their
warp shuffles, where CUDA has them; fp6 read in place where the device keeps subnormals) and in Triton's
interpreter."""
from __future__ import annotations

import pytest
import torch

from conftest import TRITON_INTERPRET, triton_device

DEVICE = triton_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a GPU or TRITON_INTERPRET=1")]
pytest.importorskip("triton")

from ipex_llm_tf.formats import get_format  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv as G  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv_planes as GP  # noqa: E402
from ipex_llm_tf.kernels import triton_linear as TL  # noqa: E402
from ipex_llm_tf.kernels.triton_tuning import GemvConfig  # noqa: E402

# (tile, activation rows): prefetched activations, prefetched weights only, no prefetch, and two rows a program (the
# second row keeps its vector loads)
CONFIGS = [(GemvConfig(16, 64, 2, 1, 2), 1), (GemvConfig(8, 32, 1, 1, 1), 1), (GemvConfig(8, 32, 1, 1, 0), 1),
           (GemvConfig(16, 32, 2, 1, 2, block_m=2), 2)]


class _WithXTile:
    """A GEMV kernel as the launcher uses it, with X_TILE forced on or off."""

    def __init__(self, kernel, on: bool):
        self.kernel, self.on = kernel, on

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **{**kwargs, "X_TILE": self.on})


@pytest.mark.parametrize("fmt_name", ["nf4", "sym_int4", "fp4"])
def test_activation_tile_gives_the_vector_loads_bits(fmt_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = get_format(fmt_name)
    torch.manual_seed(0)
    n, k = 40, 320  # 40 words a row: the 64-word step is partial (masked), the 32-word one is not
    ops = TL.block_operands(fmt, fmt.quantize(torch.randn(n, k, device=DEVICE) * 0.05))
    x = torch.randn(2, k, device=DEVICE, dtype=torch.float16)
    kernel = G.gemv_words_kernel
    for cfg, rows in CONFIGS:
        outs = []
        for on in (False, True):
            monkeypatch.setattr(G, "gemv_words_kernel", _WithXTile(kernel, on))
            outs.append(TL.gemv_blocks(x[:rows], ops, None, n, cfg))
        assert torch.equal(*outs), f"{fmt_name} {cfg}"


@pytest.mark.parametrize("fmt_name", ["nf3", "fp6"])
def test_two_plane_activation_tile_gives_the_vector_loads_sums(fmt_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = get_format(fmt_name)
    torch.manual_seed(0)
    # nf3: 20 low-plane words a row, the 32-word step partial (masked), the 16-word one not; fp6: 40, both partial
    n, k = 40, 320
    ops = TL.block_operands(fmt, fmt.quantize(torch.randn(n, k, device=DEVICE) * 0.05))
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
    kernel = GP.gemv_planes_kernel
    for cfg in (GemvConfig(16, 32, 2, 1, 0), GemvConfig(8, 16, 1, 1, 0)):
        outs = []
        for on in (False, True):
            monkeypatch.setattr(GP, "gemv_planes_kernel", _WithXTile(kernel, on))
            outs.append(TL.gemv_blocks(x, ops, None, n, cfg).float())
        if TRITON_INTERPRET:
            assert torch.equal(*outs), str(cfg)
        else:
            bound = 4 * 2.0 ** -10 * outs[0].abs().max().item()
            assert (outs[0] - outs[1]).abs().max().item() <= bound, str(cfg)
