"""scripts/ab_gemv.py without a GPU: the base revision's kernel files import each other and the working tree's
package for the rest, and every bad argument is refused with what to do. Its `check` runs in
tests/gpu/test_ab_gemv_check.py (a GPU or the interpreter)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import ab_gemv as AB  # noqa: E402


def test_kernel_files_keep_each_other_and_take_the_rest_from_the_tree() -> None:
    source = ("from .triton_gemv_tiles import (place_bits,\n    gemv_program)\nfrom .triton_tuning import _interpreting\n"
              "from ..env import env_flag\nfrom .lane_lookup import lane_lookup\nx = 'from .a import b'\n")
    assert AB._outside_imports(source).splitlines() == [
        "from .triton_gemv_tiles import (place_bits,", "    gemv_program)",
        "from ipex_llm_tf.kernels.triton_tuning import _interpreting", "from ipex_llm_tf.env import env_flag",
        "from .lane_lookup import lane_lookup", "x = 'from .a import b'"]


def test_the_base_kernels_are_the_revisions_own(tmp_path: Path) -> None:
    """Loaded from a package of the revision's files (not the working tree's modules), importable together, and
    loaded afresh for each call (a second revision in the same process gets its own files)."""
    for folder in (tmp_path / "first", tmp_path / "second"):
        base = AB.load_base("HEAD", folder)
        words, planes = base["words"].kernel, base["planes"].kernel
        assert Path(words.fn.__code__.co_filename).parent == folder / "ab_base_kernels"
        assert Path(planes.fn.__code__.co_filename).parent == folder / "ab_base_kernels"
        assert words is not AB.G.gemv_words_kernel and {"KIND", "BLOCK_W", "x_ptr"} <= base["words"].names


def test_the_base_kernels_can_come_from_a_folder(tmp_path: Path) -> None:
    """A machine without .git (the device) reads an exported revision's kernel folder; a folder without them is
    refused."""
    exported = tmp_path / "kernels"
    exported.mkdir()
    for name in AB.KERNEL_FILES:
        (exported / name).write_text(AB._base_source("HEAD", name))
    base = AB.load_base(str(exported), tmp_path / "loaded")
    assert Path(base["words"].kernel.fn.__code__.co_filename).parent == tmp_path / "loaded" / "ab_base_kernels"
    (exported / "lane_lookup.py").unlink()
    with pytest.raises(SystemExit, match="cannot read lane_lookup.py in folder"):
        AB.load_base(str(exported), tmp_path / "again")


class _RecordingKernel:
    """A kernel stand-in that records the keyword arguments of its launches, and their outputs (argument 7)."""
    arg_names = ["x_ptr", "X_TILE", "LANES"]

    def __init__(self, *extra_args: str) -> None:
        self.launched: list[dict] = []
        self.outputs: list = []
        self.arg_names = self.arg_names + list(extra_args)

    def __getitem__(self, grid: tuple) -> object:
        return lambda *args, **kwargs: self.outputs.append(args[7:8]) or self.launched.append(kwargs)


def test_forced_options_replace_the_tree_launchers_choice() -> None:
    """The base side launches with a forced constexpr (the base's own decision), drops those it does not declare,
    and passes Triton's launch options through."""
    kernel = _RecordingKernel()
    AB._KnownOptions(kernel, AB.parse_forced(["X_TILE=0"]))[(1,)](0, X_TILE=1, LANES=1, NEW_OPTION=3, num_warps=4)
    assert kernel.launched == [{"X_TILE": 0, "LANES": 1, "num_warps": 4}]


def test_tiles_parse_with_their_defaults() -> None:
    assert AB.parse_tile("8,64,4") == AB.GemvConfig(8, 64, 4)
    assert AB.parse_tile("8,64,4,2,0") == AB.GemvConfig(8, 64, 4, 2, 0)


def test_a_base_kernel_without_tail_masks_every_step() -> None:
    """The launcher reads a partial last step apart (TAIL) only on a side whose kernel declares it: a base kernel
    that predates it gets every step masked, not the full steps alone."""
    import torch
    from ipex_llm_tf.formats import get_format
    fmt = get_format("sym_int4")
    ops = AB.TL.block_operands(fmt, fmt.quantize(torch.randn(8, 352)))  # 44 words a row: a 32-word step and a part
    base, tree = _RecordingKernel("EVEN"), _RecordingKernel("EVEN", "TAIL")
    sides = AB.Sides({"words": AB._KnownOptions(base), "planes": AB._KnownOptions(_RecordingKernel())})
    sides.kernels["tree"]["words"] = tree
    x = torch.zeros(1, 352, dtype=torch.float16)
    for side in ("base", "tree"):
        sides.run(side, x, ops, 8, AB.GemvConfig(8, 32, 4, 1, 2))
    assert "TAIL" not in base.launched[-1] and not base.launched[-1]["EVEN"]
    assert tree.launched[-1]["TAIL"] and tree.launched[-1]["EVEN"]
    assert AB.TL._tail_step.__name__ == "_tail_step"  # the launcher's own again after each run


def test_a_base_kernel_without_last_sums_adds_its_splits_into_float32() -> None:
    """Split K: the tree's kernels get the partials buffer and counters (LAST_SUMS) and an output in x's dtype; a
    base kernel that predates them adds its splits into a zeroed float32 output, as its launcher did."""
    import torch
    from ipex_llm_tf.formats import get_format
    fmt = get_format("sym_int4")
    ops = AB.TL.block_operands(fmt, fmt.quantize(torch.randn(8, 1024)))  # 128 words: four 32-word steps
    base, tree = _RecordingKernel("EVEN"), _RecordingKernel("EVEN", "LAST_SUMS", "part_ptr", "arrived_ptr")
    sides = AB.Sides({"words": AB._KnownOptions(base), "planes": AB._KnownOptions(_RecordingKernel())})
    sides.kernels["tree"] = {"words": tree, "planes": tree}
    x = torch.zeros(1, 1024, dtype=torch.float16)
    for side in ("base", "tree"):
        sides.run(side, x, ops, 8, AB.GemvConfig(8, 32, 4, 2, 2))
    assert "LAST_SUMS" not in base.launched[-1] and base.outputs[-1][0].dtype == torch.float32
    assert tree.launched[-1]["LAST_SUMS"] and tree.outputs[-1][0].dtype == torch.float16
    assert AB.TL._gemv_outputs.__name__ == "_gemv_outputs"


@pytest.mark.parametrize("argv, message", [
    (["time", "--formats", "fp6", "--tiles", "8,64"], "--tiles takes BLOCK_N,BLOCK_W,WARPS"),
    (["time", "--formats", "fp6", "--tiles", "8,64,0"], "--tiles takes BLOCK_N,BLOCK_W,WARPS"),
    (["time", "--formats", "fp6", "--tiles", "8,64,4,1,x"], "--tiles takes BLOCK_N,BLOCK_W,WARPS"),
    (["time", "--formats", "fp6", "--tiles", "8,64,4,1,3"], "--tiles takes BLOCK_N,BLOCK_W,WARPS"),
    (["check", "--formats", "fp6", "--base-option", "X_TILE"], "--base-option takes NAME=INTEGER"),
    (["check", "--formats", "fp6", "--base-option", "X_TILE=off"], "--base-option takes NAME=INTEGER"),
    (["check", "--base", "no-such-revision", "--formats", "fp4"], "cannot read ipex_llm_tf/kernels/triton_gemv.py"),
    (["time", "--formats", "fp4", "--rounds", "0"], "--rounds must be at least 1"),
    (["time", "--formats", "fp4", "--shapes", "4096"], "--shapes takes INxOUT"),
])
def test_bad_arguments_are_refused(argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AB.torch.cuda, "is_available", lambda: True)  # past the device check to the argument's
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match=message):
        AB.main(argv)


def test_a_format_without_a_block_gemv_is_refused() -> None:
    with pytest.raises(SystemExit, match="fp8_e4m3 has no block-format GEMV"):
        AB.operands("fp8_e4m3", 16, 256, AB.torch.device("cpu"))


@pytest.mark.parametrize("mode, message", [("time", "time needs a CUDA GPU"), ("check", "set TRITON_INTERPRET=1")])
def test_without_a_gpu_each_mode_says_what_it_needs(mode: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AB.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match=message):
        AB.main([mode, "--formats", "fp4"])
