"""ipex_llm_tf: low-bit LLM inference for transformers users, with one changed import."""
from __future__ import annotations

from .convert import ConversionReport, convert
from .formats import FormatError, get_format, list_formats
from .low_bit_linear import LowBitLinear

__version__ = "0.1.0"

__all__ = ["ConversionReport", "FormatError", "LowBitLinear", "__version__", "convert", "get_format",
           "list_formats"]
