"""ipex_llm_tf.env: every on/off environment switch parses the same way."""
from __future__ import annotations

import pytest

from ipex_llm_tf.env import env_flag, raw_env_reader

NAME = "IPEX_LLM_TF_TEST_SWITCH"


@pytest.mark.parametrize("value, default_on, default_off", [
    (None, True, False), ("0", False, False), (" False ", False, False), ("no", False, False),
    ("1", True, True), ("TRUE", True, True), ("yes", True, True), ("maybe", True, False), ("", True, False)])
def test_env_flag(monkeypatch: pytest.MonkeyPatch, value, default_on: bool, default_off: bool) -> None:
    if value is None:
        monkeypatch.delenv(NAME, raising=False)
    else:
        monkeypatch.setenv(NAME, value)
    assert env_flag(NAME, True) is default_on
    assert env_flag(NAME, False) is default_off


def test_raw_env_reader_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot-path reader sees every change made through os.environ (set, changed, removed), as distinct keys."""
    read = raw_env_reader(NAME)
    monkeypatch.delenv(NAME, raising=False)
    assert read() is None
    monkeypatch.setenv(NAME, "1")
    one = read()
    monkeypatch.setenv(NAME, "0")
    assert read() != one and read() is not None
    monkeypatch.delenv(NAME)
    assert read() is None
