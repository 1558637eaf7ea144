"""kernels.tuning_cache: autotuning choices kept on disk per scope, reused by a later process only while still offered.

Pure Python (the Triton side, triton_tuning._pick, consults it before timing and records after): a choice is a
config dataclass, or a (launcher function, config or None) pair, stored in a JSON form and matched back against the
candidates a later process offers.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest

from ipex_llm_tf.kernels import tuning_cache


@dataclass(frozen=True)
class Tile:
    block_n: int
    num_warps: int


def gemv_launch() -> None:
    """Stands for a launcher the plans hold."""


def dequant_launch() -> None:
    """Stands for another launcher."""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("IPEX_LLM_TF_CACHE", str(tmp_path))
    monkeypatch.delenv("IPEX_LLM_TF_TUNING_CACHE", raising=False)
    _new_process(monkeypatch)
    return tmp_path


def _new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning_cache, "_MEMORY", {})
    monkeypatch.setattr(tuning_cache, "_LOADED", [])


def test_choices_survive_a_new_process(cache_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    scope, key = "H100 | triton 3.6 | abc", ("gemv", 0, 1, 11008, 4096, "torch.float16")
    candidates = [Tile(8, 4), Tile(16, 4), Tile(32, 8)]
    tuning_cache.store(scope, key, candidates[1])
    plan_key = ("mm", 5, 4, 4096, 4096, "torch.float16")
    plans = [(gemv_launch, Tile(8, 4)), (dequant_launch, None)]
    tuning_cache.store(scope, plan_key, plans[1])
    on_disk = json.loads((cache_dir / "triton_tuning.json").read_text())
    assert on_disk[scope][repr(key)] == {"type": "Tile", "block_n": 16, "num_warps": 4}
    assert on_disk[scope][repr(plan_key)] == [{"fn": "dequant_launch"}, None]
    _new_process(monkeypatch)
    assert tuning_cache.lookup(scope, key, [Tile(8, 4), Tile(16, 4)]) == Tile(16, 4)
    assert tuning_cache.lookup(scope, plan_key, plans) is plans[1], "the offered candidate itself comes back"
    assert tuning_cache.lookup(scope, key, [Tile(8, 4)]) is None, "a choice no longer offered is tuned again"
    assert tuning_cache.lookup("A100 | triton 3.6 | abc", key, candidates) is None, "another scope tunes afresh"
    tuning_cache.store("A100 | triton 3.6 | abc", key, candidates[2])
    assert set(json.loads((cache_dir / "triton_tuning.json").read_text())) == {scope, "A100 | triton 3.6 | abc"}


def test_cache_off_unreadable_and_unwritable(cache_dir, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    key = ("gemv", 0)
    monkeypatch.setenv("IPEX_LLM_TF_TUNING_CACHE", "0")
    tuning_cache.store("s", key, Tile(8, 4))
    assert not (cache_dir / "triton_tuning.json").exists() and tuning_cache.cache_path() is None
    assert tuning_cache.lookup("s", key, [Tile(8, 4)]) == Tile(8, 4), "still remembered for this process"
    monkeypatch.delenv("IPEX_LLM_TF_TUNING_CACHE")
    _new_process(monkeypatch)
    (cache_dir / "triton_tuning.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ipex_llm_tf"):
        assert tuning_cache.lookup("s", key, [Tile(8, 4)]) is None
    assert "unreadable tuning cache" in caplog.text
    tuning_cache.store("s", key, Tile(8, 4))  # replaces the broken file
    assert json.loads((cache_dir / "triton_tuning.json").read_text())["s"][repr(key)]["block_n"] == 8
    blocked = cache_dir / "file"
    blocked.write_text("")
    monkeypatch.setenv("IPEX_LLM_TF_CACHE", str(blocked))  # a directory that cannot be created
    _new_process(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ipex_llm_tf"):
        tuning_cache.store("s", key, Tile(16, 4))
    assert "could not write the tuning cache" in caplog.text
    assert tuning_cache.lookup("s", key, [Tile(16, 4)]) == Tile(16, 4)
