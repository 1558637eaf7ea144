"""On/off switches read from the environment, all parsed one way."""
from __future__ import annotations

import os

_ON, _OFF = ("1", "true", "yes"), ("0", "false", "no")


def env_flag(name: str, default: bool) -> bool:
    """Whether switch `name` is on: a default-on switch is off only for 0/false/no, a default-off one is on only for
    1/true/yes (case and surrounding spaces ignored)."""
    value = os.environ.get(name, "1" if default else "0").strip().lower()
    return value not in _OFF if default else value in _ON
