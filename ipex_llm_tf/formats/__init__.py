"""Registry of low-bit weight formats: `get_format("sym_int4")`, `list_formats()`."""
from __future__ import annotations

from .base import FormatError, LowBitFormat, Parts

_REGISTRY: dict[str, LowBitFormat] = {}


def register_format(fmt: LowBitFormat) -> LowBitFormat:
    """Add a format instance to the registry under its name."""
    if not fmt.name or fmt.name in _REGISTRY:
        raise ValueError(f"format name {fmt.name!r} is empty or already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def list_formats() -> list[str]:
    """Every registered format name, in registration order."""
    return list(_REGISTRY)


def get_format(name: "str | LowBitFormat") -> LowBitFormat:
    """The format registered under `name`; ValueError listing the valid names if there is none."""
    if isinstance(name, LowBitFormat):
        return name
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown low-bit format {name!r}; valid names are: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


# One line per format family module; each registers its formats on import.
from . import ggml_blocks, codebooks, float8, plain  # noqa: E402,F401

__all__ = ["FormatError", "LowBitFormat", "Parts", "get_format", "list_formats", "register_format"]
