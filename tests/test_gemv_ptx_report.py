"""scripts/gemv_ptx_report.py: its rows come from the real sm_90 compile (no GPU), and bad arguments are refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import gemv_ptx_report as R  # noqa: E402


def test_rows_count_the_loop_of_each_kernel() -> None:
    """sym_int4 reads its codes in place (no gathers), nf4 shuffles each code (16 words x 8 codes a thread here),
    nf3 runs the two-plane kernel; a second activation row adds multiply-adds to the same loop; registers are
    counted."""
    one = R.report_row("sym_int4", "16x64x2", 1)
    two = R.report_row("sym_int4", "16x64x2", 2)
    assert one["gathers"] == 0 and one["local"] == 0 and one["loop_instructions"] > 0
    # half the weight rows a thread, fewer registers (read from the cubin by the cuobjdump Triton ships)
    assert R.report_row("sym_int4", "8x64x2", 1)["registers"] < one["registers"] <= 255
    assert two["top_opcodes"]["fma.rn.f32"] == 2 * one["top_opcodes"]["fma.rn.f32"]
    nf4 = R.report_row("nf4", "16x64x2", 1)  # as on CUDA: a warp shuffle a code, no table loads (lane_lookup)
    assert nf4["gathers"] == 0 and nf4["top_opcodes"]["shfl.sync.idx.b32"] == 8 * 16
    assert R.report_row("nf3", "16x64x2", 1)["loop_instructions"] > 0
    assert R.report_row("nf3", "16x64x2", 2) is None, "the two-plane GEMV serves one row a program"


@pytest.mark.parametrize("tile", ["16x64", "16xx2", "ax64x2"])
def test_malformed_tiles_are_refused(tile: str) -> None:
    with pytest.raises(SystemExit, match="BLOCK_NxBLOCK_Wxwarps"):
        R.parse_tile(tile)


def test_formats_without_a_block_gemv_are_refused() -> None:
    with pytest.raises(SystemExit, match="no block-format GEMV"):
        R.report_row("fp8_e4m3", "16x64x2", 1)


LOOP_AFTER = ["\tld.global.b32 %r1, [%rd1];", "$L__BB0_3:", "\tst.global.b32 [%rd2], %r1;", "\tret;"]


@pytest.mark.parametrize("header", [["$L__BB0_2:                              // =>This Inner Loop Header: Depth=1"],
                                    ["$L__BB0_2:                              // %.lr.ph",
                                     "                                        // =>This Inner Loop Header: Depth=1"]],
                         ids=["label-on-the-comment-line", "label-above-the-comment"])
def test_loop_body_finds_the_loop_as_either_triton_prints_it(header: list[str]) -> None:
    """LLVM puts the loop-header comment on its label's line (the host's Triton 3.9) or, where the block has a name
    to print, on a line of its own under it (Triton 3.6, the device's): both give the same loop."""
    from ipex_llm_tf.kernels.sm90_ptx import loop_body
    lines = ["\tmov.u32 %r0, 0;", *header, "\tadd.s32 %r1, %r1, 1;", "\tfma.rn.f32 %f1, %f2, %f3, %f1;",
             "\t@%p2 bra \t$L__BB0_2;", *LOOP_AFTER]
    assert loop_body(lines) == ["add.s32 %r1, %r1, 1;", "fma.rn.f32 %f1, %f2, %f3, %f1;", "@%p2 bra \t$L__BB0_2;"]
