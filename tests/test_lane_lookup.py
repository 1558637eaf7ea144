"""When the decode GEMV looks nf4 codes up by warp shuffles (kernels/lane_lookup, LANES): only on CUDA, never in the
interpreter or with IPEX_LLM_TF_LANE_LOOKUP=0, and only for the 16-entry codebook kind read through its table.

What the shuffles compile to is checked in tests/test_gemv_ptx.py; that they give the table path's bits, on a GPU, in
tests/gpu/test_triton_linear.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ipex_llm_tf.formats import get_format  # noqa: E402
from ipex_llm_tf.kernels import lane_lookup as LL  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv as G  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv_planes as GP  # noqa: E402
from ipex_llm_tf.kernels import triton_linear as TL  # noqa: E402
from ipex_llm_tf.kernels.triton_tuning import GemvConfig  # noqa: E402

CUDA = torch.device("cuda", 0)


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine that compiles kernels (this suite may run under TRITON_INTERPRET=1)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(LL.LANE_LOOKUP_ENV, raising=False)


def test_on_for_cuda(compiled) -> None:
    assert LL.lanes_available(CUDA)


@pytest.mark.parametrize("device", ["cpu", "xpu", "meta"])
def test_off_on_other_devices(compiled, device: str) -> None:
    assert not LL.lanes_available(torch.device(device))


@pytest.mark.parametrize("value", ["0", "false", "no"])
def test_switched_off_by_the_environment(compiled, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(LL.LANE_LOOKUP_ENV, value)
    assert not LL.lanes_available(CUDA)


def test_off_in_the_interpreter(compiled, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not LL.lanes_available(CUDA)


def test_info_says_how_and_why(compiled, monkeypatch: pytest.MonkeyPatch) -> None:
    assert LL.describe_lanes(CUDA).endswith("warp shuffles from registers")
    assert "CUDA-only" in LL.describe_lanes(torch.device("xpu"))
    monkeypatch.setenv(LL.LANE_LOOKUP_ENV, "0")
    assert "IPEX_LLM_TF_LANE_LOOKUP=0" in LL.describe_lanes(CUDA)
    monkeypatch.setenv(LL.LANE_LOOKUP_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter" in LL.describe_lanes(CUDA)


class _Recorder:
    """Stands in for gemv_words_kernel: records the keywords of one launch."""

    def __init__(self) -> None:
        self.options: dict = {}
        self.args: tuple = ()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args, self.options = args, kwargs
        return launch


@pytest.mark.parametrize("fmt_name, lanes", [("nf4", True), ("fp4", False), ("sym_int4", False), ("asym_int5", False),
                                             ("sym_int8", False), ("nf3", True), ("fp6", False)])
def test_the_launcher_asks_for_lanes_only_for_table_lookups(fmt_name: str, lanes: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On a device with shuffles nf4 and nf3 (table lookups) get LANES and their activations as one tile; fp4 and
    fp6 keep their codes read in place (faster there for fp4), fp6 with its activations as one tile, and the integer
    kinds their own decoding."""
    recorder = _Recorder()
    monkeypatch.setattr(G, "gemv_words_kernel", recorder)
    monkeypatch.setattr(GP, "gemv_planes_kernel", recorder)
    monkeypatch.setattr(TL, "lanes_available", lambda device: True)
    fmt = get_format(fmt_name)
    ops = TL.block_operands(fmt, fmt.quantize(torch.randn(16, 256)))
    ops.subnormal = fmt_name in ("fp4", "fp6", "sym_int4", "sym_int8")  # as on a device that keeps float32 subnormals
    x = torch.randn(1, 256, dtype=torch.float16)
    TL._gemv_words(x, ops, None, torch.empty(1, 16, dtype=torch.float16), 16, GemvConfig(8, 64, 4), 1, gated=False)
    assert recorder.options.get("LANES", False) is lanes
    assert recorder.options["SUBNORMAL"] is ops.subnormal
    # with the shuffles, a step's activations come as one tile (X_TILE), and for fp6 read in place
    assert recorder.options.get("X_TILE", False) is (lanes or fmt_name == "fp6")
    # the lanes hold the plain table's values; nf3's table loads read its pair table
    assert recorder.args[5] is (ops.table if lanes else ops.gemv_table)
