"""On/off switches read from the environment, all parsed one way."""
from __future__ import annotations

import os
from typing import Callable

_ON, _OFF = ("1", "true", "yes"), ("0", "false", "no")


def env_flag(name: str, default: bool) -> bool:
    """Whether switch `name` is on: a default-on switch is off only for 0/false/no, a default-off one is on only for
    1/true/yes (case and surrounding spaces ignored)."""
    value = os.environ.get(name, "1" if default else "0").strip().lower()
    return value not in _OFF if default else value in _ON


def raw_env_reader(name: str) -> Callable[[], object]:
    """A fast reader of variable `name` for hot paths: its raw value (bytes on POSIX) or None, for use as a cache
    key. os.environ.get encodes the key and decodes the value on every call (~1-2 us); this reads the mapping
    os.environ keeps in sync, where this Python has one."""
    data = getattr(os.environ, "_data", None)
    if data is not None and hasattr(os.environ, "encodekey"):
        key = os.environ.encodekey(name)
        return lambda: data.get(key)
    return lambda: os.environ.get(name)
