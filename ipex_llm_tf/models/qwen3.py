"""Qwen3: Qwen2's decoder plus an RMSNorm over each head's q and k before RoPE."""
from __future__ import annotations

from dataclasses import replace
from functools import partial

from . import register_architecture
from .patching import patch_decoder_model
from .qwen2 import QWEN2_OPTIONS

register_architecture("qwen3", partial(patch_decoder_model, options=replace(QWEN2_OPTIONS, qk_norm=True)))
