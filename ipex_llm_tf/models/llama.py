"""Llama: the plain fused decoder (no q/k norm, full attention in every layer)."""
from __future__ import annotations

from functools import partial

from . import register_architecture
from .common import DecoderOptions
from .patching import patch_decoder_model

register_architecture("llama", partial(patch_decoder_model, options=DecoderOptions()))
