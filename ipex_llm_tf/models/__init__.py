"""Fused forwards for decoder architectures, installed on one model instance at a time, chosen by config.model_type.

Patching swaps modules inside the given model only; transformers' classes and modules are never modified, so a
patched and an unpatched model of the same class can live side by side.
"""
from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from .common import UnsupportedModelError

logger = logging.getLogger("ipex_llm_tf")

Patcher = Callable[[nn.Module], None]

# attention implementations whose masks FusedAttention reads (4-D float/bool or None); flash/flex pass other kinds
SUPPORTED_ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa")
_PATCHED_FLAG = "_ipex_llm_tf_fused_forward"
_PATCHERS: dict[str, Patcher] = {}


def register_architecture(model_type: str, patcher: Patcher) -> None:
    """Make `patcher` (model -> None, raising UnsupportedModelError before any change) handle `model_type`."""
    if not model_type or model_type in _PATCHERS:
        raise ValueError(f"model_type {model_type!r} is empty or already has a fused forward")
    _PATCHERS[model_type] = patcher


def supported_architectures() -> list[str]:
    """The model_type values that have a fused forward."""
    return sorted(_PATCHERS)


def optimize_architecture(model: nn.Module) -> bool:
    """Install the fused forward on this *ForCausalLM / *Model instance in place; False (logged) if none fits."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    patcher = _PATCHERS.get(model_type)
    if patcher is None:
        logger.info("no fused forward for model_type %s; using low-bit linears with transformers' own forward",
                    model_type)
        return False
    if getattr(model, _PATCHED_FLAG, False):
        return True
    attn_implementation = getattr(config, "_attn_implementation", None)
    if attn_implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        logger.info("no fused forward for attn_implementation %s (model_type %s); using low-bit linears with "
                    "transformers' own forward", attn_implementation, model_type)
        return False
    try:
        patcher(model)
    except UnsupportedModelError as err:
        logger.info("no fused forward for this %s model (%s); using low-bit linears with transformers' own forward",
                    model_type, err)
        return False
    setattr(model, _PATCHED_FLAG, True)
    logger.info("installed the fused %s forward", model_type)
    return True


def is_optimized(model: nn.Module) -> bool:
    """Whether optimize_architecture patched this instance."""
    return bool(getattr(model, _PATCHED_FLAG, False))


# Each architecture module registers itself on import.
from . import llama, mistral, qwen2, qwen3  # noqa: E402,F401

__all__ = ["UnsupportedModelError", "is_optimized", "optimize_architecture", "register_architecture",
           "supported_architectures"]
