"""scripts/ab_gemv.py check, on a GPU or in Triton's interpreter: the working tree's launcher runs a revision's
kernels and its own on the same operands. Against HEAD, with the kernel files unchanged since, the two sides are the
same code, so every output is equal to the bit (a side swapped the wrong way round would still be equal, so the
test also checks which kernel each side launched)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import triton_device

DEVICE = triton_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a GPU or TRITON_INTERPRET=1")]
pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import ab_gemv as AB  # noqa: E402


class _Recording:
    """A side's words kernel that notes which side launched it."""

    def __init__(self, kernel, side: str, log: list[str]) -> None:
        self.kernel, self.side, self.log = kernel, side, log

    def __getitem__(self, grid):
        self.log.append(self.side)
        return self.kernel[grid]

    def __getattr__(self, name: str):  # what the kernel declares (ab_gemv.declared), from the kernel itself
        return getattr(self.kernel, name)


def test_check_runs_both_sides_through_the_launcher(tmp_path: Path) -> None:
    sides = AB.Sides(AB.load_base("HEAD", tmp_path))
    launched: list[str] = []
    for side in ("base", "tree"):
        sides.kernels[side] = {**sides.kernels[side], "words": _Recording(sides.kernels[side]["words"], side, launched)}
    rows = AB.check(sides, ["fp4", "sym_int5"], DEVICE)
    assert launched[:2] == ["base", "tree"] and len(rows) == 2 * len(AB.CHECK_SHAPES) * len(AB.CHECK_CONFIGS)
    unchanged = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "ipex_llm_tf/kernels"])
    if unchanged.returncode == 0:
        assert all(row["equal"] for row in rows), [row for row in rows if not row["equal"]]
