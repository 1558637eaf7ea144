"""Mistral: Llama's decoder with one sliding attention window for every layer."""
from __future__ import annotations

from functools import partial
from typing import Any

from . import register_architecture
from .common import DecoderOptions
from .patching import patch_decoder_model


def config_sliding_window(config: Any, layer_idx: int) -> int | None:
    """Mistral applies config.sliding_window (None: unlimited) to all layers alike."""
    return getattr(config, "sliding_window", None)


MISTRAL_OPTIONS = DecoderOptions(sliding_window=config_sliding_window)

register_architecture("mistral", partial(patch_decoder_model, options=MISTRAL_OPTIONS))
