"""Build a low-bit transformers model from a .gguf file, keeping GGUF's own ggml blocks where a lossless map exists.

Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 linear weights become sym_int4 / asym_int4 / sym_int5 / asym_int5 / sym_int8 with
no re-quantization when `low_bit` is None (or names that same format). Every other tensor type (K-quants, F16, ...)
is dequantized and, for Linear layers, quantized to `low_bit`, or to FALLBACK_LOW_BIT when low_bit is None.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .convert import convert, resolve_modules_to_not_convert
from .formats import get_format
from .gguf_import import read_gguf
from .loading import SkeletonFiller
from .low_bit_linear import LowBitEmbedding, LowBitLinear
from .optimize import finalize
from .serialization import CheckpointError

# 8 bits keep K-quant weights (2..6 bits) without adding visible error when no format was asked for
FALLBACK_LOW_BIT = "sym_int8"


def _place_packed(model: nn.Module, module_path: str, low_bit: str, parts: dict) -> None:
    layer = model.get_submodule(module_path)
    if layer.low_bit != low_bit:
        parent, _, child = module_path.rpartition(".")
        layer = LowBitLinear(layer.in_features, layer.out_features, low_bit, bias=layer.bias is not None,
                             device="meta", name=module_path)
        model.get_submodule(parent).register_module(child, layer)
    layer.load_parts(parts)


def _place_packed_embedding(model: nn.Module, embedding: nn.Embedding, low_bit: str, parts: dict,
                            tied: bool) -> None:
    # A quantized token table stays quantized: lookups dequantize only the rows they gather, and a tied head
    # computes with the very same blocks (what llama.cpp does), so the table is stored once, never in float.
    packed = LowBitEmbedding(embedding.num_embeddings, embedding.embedding_dim, low_bit,
                             padding_idx=embedding.padding_idx, device="meta")
    packed.output_dtype = embedding.weight.dtype
    packed.load_parts(parts)
    model.set_input_embeddings(packed)
    head = model.get_output_embeddings()
    if tied and isinstance(head, nn.Linear):
        shared = LowBitLinear(head.in_features, head.out_features, low_bit, bias=False, device="meta")
        shared.load_parts(packed.parts)
        model.set_output_embeddings(shared)


def load_gguf_model(auto_cls, gguf_path: "str | Path", low_bit: "str | None" = None,
                    modules_to_not_convert: "list[str] | None" = None, cpu_embedding: bool = False,
                    optimize_model: bool = True, quantize_kv_cache: "bool | None" = None,
                    dtype: "torch.dtype | str | None" = None,
                    torch_dtype: "torch.dtype | str | None" = None, **unused) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a GGUF file; see the module docstring for which tensors stay as they are."""
    from .auto import resolve_dtype
    if unused:
        raise TypeError(f"from_gguf got unsupported arguments {sorted(unused)}")
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if low_bit is not None:
        low_bit = get_format(low_bit).name
    checkpoint = read_gguf(path)
    target_dtype = resolve_dtype(dtype or torch_dtype)
    keep = resolve_modules_to_not_convert(modules_to_not_convert)
    config, tokenizer = checkpoint.config, checkpoint.load_tokenizer()  # both parse metadata: before weights arrive
    gc.collect()
    model = auto_cls._skeleton(config, target_dtype, {})
    default = low_bit or FALLBACK_LOW_BIT
    convert(model, default, keep)
    filler = SkeletonFiller(model, target_dtype, str(path))
    linear_paths = {name for name, m in model.named_modules() if isinstance(m, LowBitLinear)}
    embedding = model.get_input_embeddings()
    embedding_path = next(name for name, m in model.named_modules() if m is embedding)
    for tensor in tqdm(checkpoint.tensors, total=len(checkpoint), desc="Loading GGUF", unit="tensor",
                       disable=None, leave=False):
        module_path, _, attr = tensor.hf_name.rpartition(".")
        if (attr == "weight" and module_path in linear_paths and tensor.parts is not None
                and low_bit in (None, tensor.low_bit)):
            _place_packed(model, module_path, tensor.low_bit, tensor.parts)
        elif module_path == embedding_path and tensor.parts is not None and low_bit in (None, tensor.low_bit):
            _place_packed_embedding(model, embedding, tensor.low_bit, tensor.parts, checkpoint.tied_embeddings)
        else:
            filler.feed(tensor.hf_name, tensor.dequantize(torch.float32))
    try:
        filler.finish()
    except CheckpointError as err:
        raise CheckpointError(f"{err} (GGUF architecture {checkpoint.architecture!r})") from err
    # low_bit None: record the most common format
    model = finalize(model, low_bit, keep, cpu_embedding, optimize_model, quantize_kv_cache)
    return model, tokenizer
