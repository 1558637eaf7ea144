"""convert(): which layers are swapped, which are kept and why, and the output it produces."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import relative_error
from ipex_llm_tf import LowBitLinear, convert


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.down_proj = nn.Linear(128, 64, bias=False)
        self.odd = nn.Linear(48, 16)  # 48 is not a multiple of 32


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(64, 100, bias=False)


def test_convert_swaps_all_but_lm_head_by_default() -> None:
    model = Tiny()
    with pytest.warns(UserWarning, match="layers.0.odd.*block size"):
        report = convert(model, "sym_int4")
    assert sorted(report.converted) == ["layers.0.down_proj", "layers.0.q_proj", "layers.1.down_proj", "layers.1.q_proj"]
    assert report.skipped["lm_head"] == "named in modules_to_not_convert"
    assert "block size" in report.skipped["layers.1.odd"]
    assert isinstance(model.layers[1].q_proj, LowBitLinear) and isinstance(model.lm_head, nn.Linear)
    assert "4 Linear layers converted" in str(report)


def test_explicit_modules_to_not_convert() -> None:
    model = Tiny()
    with pytest.warns(UserWarning):
        report = convert(model, "nf4", modules_to_not_convert=["down_proj", "layers.1.q_proj"])
    assert sorted(report.converted) == ["layers.0.q_proj", "lm_head"]
    assert isinstance(model.layers[0].down_proj, nn.Linear) and isinstance(model.lm_head, LowBitLinear)
    with pytest.raises(TypeError, match="list of module names"):
        convert(Tiny(), "nf4", modules_to_not_convert="lm_head")


def test_converted_layer_output() -> None:
    model = Tiny()
    reference = model.layers[0].q_proj
    x = torch.randn(3, 64)
    expected = reference(x)
    with pytest.warns(UserWarning):
        convert(model, "sym_int8")
    assert relative_error(model.layers[0].q_proj(x), expected) < 3e-2


def test_convert_meta_skeleton() -> None:
    with torch.device("meta"):
        model = Tiny()
    with pytest.warns(UserWarning):
        convert(model, "asym_int4")
    layer = model.layers[0].q_proj
    assert isinstance(layer, LowBitLinear) and layer.qweight.device.type == "meta"


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown low-bit format 'int2'"):
        convert(Tiny(), "int2")
