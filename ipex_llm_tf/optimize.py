"""The one-line PyTorch API: optimize_model(model), low_memory_init(), load_low_bit(model, dir), save_low_bit."""
from __future__ import annotations

import contextlib
import json
import logging
import types
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import __version__
from .convert import check_mixed_precision, convert, quantize_head, resolve_modules_to_not_convert
from .devices import check_device, CPUEmbedding, move_model
from .env import env_flag
from .formats import get_format
from .loading import SkeletonFiller, parameters_on_meta
from .low_bit_linear import CPULowBitEmbedding, LowBitEmbedding, LowBitLinear
from .serialization import (CONFIG_FIELD, FORMAT_VERSION, CheckpointError, check_quantization_field,
                            count_tensors, iter_tensors, quantization_field, safetensors_files, write_checkpoint)

logger = logging.getLogger("ipex_llm_tf")


@contextlib.contextmanager
def low_memory_init() -> Iterator[None]:
    """Build models with every parameter on the meta device (no memory), to be filled by load_low_bit()."""
    with parameters_on_meta():
        yield


def _canonical_linears(model: nn.Module) -> list[tuple[str, LowBitLinear]]:
    """(transformers name, layer) for every LowBitLinear, seeing through merged projections (qkv, gate/up).

    Patched modules that merge projections expose `_separate_names` / `_merged_name` (models/common.py) and already
    save under the separate names; this gives the same names for the per-layer format record.
    """
    found, merged_ids = [], set()
    for name, module in model.named_modules():
        separate = getattr(module, "_separate_names", None)
        if not separate:
            continue
        merged = getattr(module, module._merged_name)
        layers = list(merged.projections) if hasattr(merged, "projections") else [merged] * len(separate)
        merged_ids.update(id(m) for m in merged.modules())
        found += [(f"{name}.{n}" if name else n, layer) for n, layer in zip(separate, layers)
                  if isinstance(layer, LowBitLinear)]
    found += [(name, m) for name, m in model.named_modules() if isinstance(m, LowBitLinear) and id(m) not in merged_ids]
    return found


def _embedding_format(model: nn.Module) -> "str | None":
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return embedding.low_bit if isinstance(embedding, LowBitEmbedding) else None


def _record(model: nn.Module, low_bit: "str | None", modules_to_not_convert: list[str], cpu_embedding: bool) -> dict:
    names = [(name, layer.low_bit) for name, layer in _canonical_linears(model)]
    counts: dict[str, int] = {}
    for _, fmt in names:
        counts[fmt] = counts.get(fmt, 0) + 1
    low_bit = low_bit or (max(counts, key=counts.get) if counts else "sym_int4")
    used = set(counts) | {low_bit} | ({_embedding_format(model)} - {None})
    field = {"quant_method": "ipex_llm_tf", "format_version": FORMAT_VERSION, "low_bit": low_bit,
             "layer_formats": {n: f for n, f in names if f != low_bit}, "modules_to_not_convert": modules_to_not_convert,
             "cpu_embedding": cpu_embedding, "embedding_format": _embedding_format(model), "formats": {n: get_format(n).version for n in sorted(used)},
             "package_version": __version__}
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_FIELD, field)
    return field


def attach_low_bit_methods(model: nn.Module) -> nn.Module:
    """Give this model instance save_low_bit / push_to_hub (low-bit) and a .to() that checks the device exists."""
    model.save_low_bit = types.MethodType(save_low_bit, model)
    from .hub import push_low_bit_to_hub
    model.push_to_hub = types.MethodType(push_low_bit_to_hub, model)
    model.to = types.MethodType(_move_low_bit_model, model)
    model.cuda = types.MethodType(_cuda_low_bit_model, model)
    return model


def _move_low_bit_model(model: nn.Module, *args, **kwargs) -> nn.Module:
    """model.to(...) with the device checked first and graph decoding following the model onto / off CUDA."""
    moved = move_model(model, *args, **kwargs)
    from .models.graph_decode import sync_graph_decode
    sync_graph_decode(moved)
    return moved


def _cuda_low_bit_model(model: nn.Module, device: "int | str | torch.device | None" = None) -> nn.Module:
    """model.cuda(...) as model.to("cuda..."), so the same checks and graph-decoding switch apply."""
    return _move_low_bit_model(model, torch.device("cuda", device) if isinstance(device, int) else device or "cuda")


def _apply_cpu_embedding(model: nn.Module) -> None:
    get, set_ = getattr(model, "get_input_embeddings", None), getattr(model, "set_input_embeddings", None)
    if not (callable(get) and callable(set_)):
        raise TypeError(f"cpu_embedding=True needs a model with get/set_input_embeddings; {type(model).__name__} "
                        f"has none")
    embedding = get()
    if isinstance(embedding, nn.Embedding) and not isinstance(embedding, CPUEmbedding):
        set_(CPUEmbedding.from_embedding(embedding))
    elif isinstance(embedding, LowBitEmbedding) and not isinstance(embedding, CPULowBitEmbedding):
        set_(CPULowBitEmbedding.from_embedding(embedding))  # a GGUF's or mixed_precision's packed table


def quantized_kv_cache_requested(quantize_kv_cache: "bool | None") -> bool:
    """The explicit argument, else IPEX_LLM_TF_QUANTIZE_KV_CACHE=1."""
    if quantize_kv_cache is not None:
        return bool(quantize_kv_cache)
    return env_flag("IPEX_LLM_TF_QUANTIZE_KV_CACHE", False)


def _generate_with_fp8_cache(model: nn.Module, *args, **kwargs):
    """generate() that brings an fp8 KV cache unless the caller passed a cache of their own."""
    from .models.graph_decode import CACHE_KWARG
    from .models.kv_cache import Fp8BlockKVCache
    if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
        kwargs[CACHE_KWARG] = Fp8BlockKVCache()
    return type(model).generate(model, *args, **kwargs)


def graph_decode_requested() -> bool:
    """IPEX_LLM_TF_GRAPH_DECODE (default 1): 0 keeps CUDA decode steps eager, for debugging and profiling."""
    return env_flag("IPEX_LLM_TF_GRAPH_DECODE", True)


def finalize(model: nn.Module, low_bit: "str | None", modules_to_not_convert: list[str], cpu_embedding: bool,
             optimize_model: bool = True, quantize_kv_cache: "bool | None" = None) -> nn.Module:
    """Common tail of every low-bit entry point: cpu embedding, fused forwards, metadata, instance methods."""
    if cpu_embedding:
        _apply_cpu_embedding(model)
    fp8_cache = quantized_kv_cache_requested(quantize_kv_cache) and hasattr(model, "generate")
    if optimize_model:
        from .models import optimize_architecture
        # generate() of a graph-decoding model brings the fp8 cache itself: float8 graph storage on CUDA (sm_89+),
        # the eager Fp8BlockKVCache elsewhere
        if optimize_architecture(model) and graph_decode_requested() and hasattr(model, "lm_head"):
            from .models.graph_decode import want_graph_decode
            want_graph_decode(model, fp8_kv=fp8_cache)
            fp8_cache = False
    if fp8_cache:
        model.generate = types.MethodType(_generate_with_fp8_cache, model)
    _record(model, low_bit, modules_to_not_convert, cpu_embedding)
    model.eval()
    return attach_low_bit_methods(model)


def optimize_model(model: nn.Module, low_bit: str = "sym_int4", optimize_llm: bool = True,
                   modules_to_not_convert: "list[str] | None" = None, cpu_embedding: bool = False,
                   device: "str | torch.device | None" = None, quantize_kv_cache: "bool | None" = None,
                   mixed_precision: bool = False) -> nn.Module:
    """Quantize a loaded PyTorch / transformers model in place to `low_bit` and apply fused forwards.

    mixed_precision=True (as in IPEX-LLM) quantizes lm_head, and the embedding tied to it, to sym_int8.
    """
    get_format(low_bit)
    if mixed_precision:
        check_mixed_precision(low_bit, modules_to_not_convert)
    keep = resolve_modules_to_not_convert(modules_to_not_convert)
    if device is not None:
        check_device(device)
    convert(model, low_bit, keep)  # logs what it converted and what it kept
    if mixed_precision:
        quantize_head(model)
    model = finalize(model, get_format(low_bit).name, keep, cpu_embedding, optimize_llm, quantize_kv_cache)
    return model.to(device) if device is not None else model


def save_low_bit(model: nn.Module, save_directory: "str | Path", tokenizer=None,
                 max_shard_size: "int | str" = "5GB") -> Path:
    """Save a low-bit model as safetensors + config.json (+ generation config, tokenizer), atomically."""
    field = quantization_field(getattr(model, "config", None) or {})
    if field is None:
        raise CheckpointError("save_low_bit needs a model made by ipex_llm_tf (from_pretrained(load_in_low_bit=...)"
                              " or optimize_model()); this one has no low-bit layers recorded")
    field = _record(model, field["low_bit"], field["modules_to_not_convert"], field["cpu_embedding"])
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        storage = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in tied or (tensor.numel() and storage in seen):
            continue  # a tied head's tensors: load re-ties them (loading.tie_embeddings)
        seen.add(storage)
        state[key] = tensor
    config_dict = model.config.to_dict()
    config_dict[CONFIG_FIELD] = field

    def extra(tmp: Path) -> None:
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_checkpoint(save_directory, state, config_dict, extra, max_shard_size)


def read_field(directory: Path) -> dict:
    """The low-bit field of a saved directory's config.json; CheckpointError for a normal checkpoint."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; it is not a saved model directory")
    field = quantization_field(json.loads(config_path.read_text()))
    if field is None:
        raise CheckpointError(f"{directory} is a normal (not low-bit) checkpoint: load it with "
                              f"AutoModelForCausalLM.from_pretrained(path, load_in_low_bit=...) instead of "
                              f"load_low_bit")
    check_quantization_field(field, str(directory))
    return field


def convert_as_saved(model: nn.Module, field: dict, dtype: "torch.dtype | None" = None) -> None:
    """Turn a meta skeleton's layers into the low-bit modules a checkpoint's field records (formats, embedding)."""
    convert(model, field["low_bit"], list(field.get("modules_to_not_convert", [])))
    for name, low_bit in field.get("layer_formats", {}).items():
        layer = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, LowBitLinear(
            layer.in_features, layer.out_features, low_bit, bias=layer.bias is not None, device="meta", name=name))
    if field.get("embedding_format"):
        old = model.get_input_embeddings()
        packed = LowBitEmbedding(old.num_embeddings, old.embedding_dim, field["embedding_format"],
                                 padding_idx=old.padding_idx, device="meta")
        packed.output_dtype = dtype or old.weight.dtype
        model.set_input_embeddings(packed)


def fill_low_bit(model: nn.Module, directory: Path, field: dict, dtype: "torch.dtype | None" = None) -> nn.Module:
    """Convert a meta skeleton as the field says and stream the saved packed tensors into it."""
    convert_as_saved(model, field, dtype)
    files = safetensors_files(directory)
    filler = SkeletonFiller(model, dtype, str(directory))
    filler.feed_all(iter_tensors(files), count_tensors(files), desc=f"Loading {field['low_bit']}")
    filler.finish()
    return model


def load_low_bit(model: nn.Module, model_path: "str | Path") -> nn.Module:
    """Fill a model built under low_memory_init() (or a normal one) with a saved low-bit checkpoint."""
    from .hub import resolve_checkpoint_dir
    directory = resolve_checkpoint_dir(model_path)
    field = read_field(directory)
    for module in model.modules():  # a normally built model: drop its full-precision weights first
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type != "meta":
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
    fill_low_bit(model, directory, field)
    return finalize(model, field["low_bit"], field.get("modules_to_not_convert", []), field.get("cpu_embedding",
                                                                                                 False))
