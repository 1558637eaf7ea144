"""Qwen2: Llama's decoder with q/k/v biases (carried over by the merge) and per-layer-type sliding windows."""
from __future__ import annotations

from functools import partial
from typing import Any

from . import register_architecture
from .common import DecoderOptions
from .patching import patch_decoder_model


def layer_type_sliding_window(config: Any, layer_idx: int) -> int | None:
    """Qwen's rule: only layers whose config.layer_types entry is "sliding_attention" use config.sliding_window."""
    layer_types = getattr(config, "layer_types", None) or []
    if layer_idx < len(layer_types) and layer_types[layer_idx] == "sliding_attention":
        return config.sliding_window
    return None


QWEN2_OPTIONS = DecoderOptions(sliding_window=layer_type_sliding_window)

register_architecture("qwen2", partial(patch_decoder_model, options=QWEN2_OPTIONS))
