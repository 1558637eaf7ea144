"""ipex_llm_tf: low-bit LLM inference for transformers users, with one changed import."""
from __future__ import annotations

__version__ = "0.1.0"

from .convert import ConversionReport, convert  # noqa: E402
from .formats import FormatError, get_format, list_formats  # noqa: E402
from .low_bit_linear import LowBitLinear  # noqa: E402
from .optimize import optimize_model  # noqa: E402
from .models.graph_decode import release_kv_storage  # noqa: E402
from .auto import AutoModel, AutoModelForCausalLM  # noqa: E402

__all__ = ["AutoModel", "AutoModelForCausalLM", "ConversionReport", "FormatError", "LowBitLinear", "__version__",
           "convert", "get_format", "list_formats", "optimize_model", "release_kv_storage"]
