"""Autotuning choices kept on disk, so a new process reuses them instead of timing every candidate again.

Timing the candidates of each (path, format, rows, shape, dtype) costs a 7B model ~10-20 s of its first generate(),
and a choice made by one median timing can differ from process to process. The choices are stored per scope (the
device's name, Triton's version and a hash of the kernel sources, so a new GPU, Triton or kernel tunes afresh) in
`$IPEX_LLM_TF_CACHE/triton_tuning.json` (default ~/.cache/ipex_llm_tf); IPEX_LLM_TF_TUNING_CACHE=0 turns it off.
A stored choice is only used when it is still one of the candidates offered.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ..env import env_flag

_LOG = logging.getLogger("ipex_llm_tf")
_MEMORY: dict[str, dict[str, Any]] = {}  # what this process read or stored, per scope
_LOADED: list[Path] = []


def cache_path() -> Path | None:
    """The JSON file holding tuning choices, or None when IPEX_LLM_TF_TUNING_CACHE=0."""
    if not env_flag("IPEX_LLM_TF_TUNING_CACHE", True):
        return None
    root = Path(os.environ.get("IPEX_LLM_TF_CACHE", Path.home() / ".cache" / "ipex_llm_tf"))
    return root / "triton_tuning.json"


def encode(choice: Any) -> Any:
    """A JSON form of a tuning choice: configs (dataclasses) by field, launchers (functions) by name."""
    if dataclasses.is_dataclass(choice) and not isinstance(choice, type):
        return {"type": type(choice).__name__, **dataclasses.asdict(choice)}
    if isinstance(choice, (tuple, list)):
        return [encode(item) for item in choice]
    if callable(choice):
        return {"fn": getattr(choice, "__name__", repr(choice))}
    return choice


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        _LOG.warning("ignoring the unreadable tuning cache %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _entries(scope: str) -> dict[str, Any]:
    path = cache_path()
    if path is not None and path not in _LOADED:
        for name, entries in _read(path).items():
            if isinstance(entries, dict):
                _MEMORY.setdefault(name, {}).update(entries)
        _LOADED.append(path)
    return _MEMORY.setdefault(scope, {})


def lookup(scope: str, key: tuple, candidates: list) -> Any:
    """The candidate stored for `key` in `scope`, or None (nothing stored, or it is no longer a candidate)."""
    stored = _entries(scope).get(repr(key))
    if stored is None:
        return None
    return next((candidate for candidate in candidates if encode(candidate) == stored), None)


def store(scope: str, key: tuple, choice: Any) -> None:
    """Record a tuning choice in memory and on disk (merged with what other processes wrote, replaced atomically)."""
    entries = _entries(scope)
    entries[repr(key)] = encode(choice)
    path = cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data.setdefault(scope, {}).update(entries)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".triton_tuning.", suffix=".json")
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(data, out, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:  # a read-only home still tunes, it just cannot remember
        _LOG.warning("could not write the tuning cache %s: %s", path, err)
