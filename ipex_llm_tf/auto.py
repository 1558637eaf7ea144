"""The transformers-facing facade: AutoModelForCausalLM / AutoModel with load_in_4bit / load_in_low_bit.

Without a low-bit argument, and for checkpoints that are not ours, everything is passed to transformers untouched.
Coupling to transformers goes through public API only (AutoConfig, from_config, GenerationConfig, tie_weights).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers
from torch import nn

from .convert import check_mixed_precision, convert, quantize_head, resolve_modules_to_not_convert
from .formats import get_format
from .hub import resolve_checkpoint_dir
from .loading import SkeletonFiller, parameters_on_meta
from .optimize import fill_low_bit, finalize, read_field
from .serialization import count_tensors, iter_tensors, quantization_field, safetensors_files

logger = logging.getLogger("ipex_llm_tf")

HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder")
MODEL_KWARGS = ("attn_implementation", "trust_remote_code")


def resolve_low_bit(load_in_4bit: bool = False, load_in_low_bit: "str | None" = None) -> "str | None":
    """The format a from_pretrained call asks for: load_in_4bit means sym_int4; both at once must agree."""
    if load_in_low_bit is not None:
        name = get_format(load_in_low_bit).name
        if load_in_4bit and name != "sym_int4":
            raise ValueError(f"load_in_4bit=True means sym_int4 but load_in_low_bit={load_in_low_bit!r} was also "
                             f"given; pass only one of them")
        return name
    return "sym_int4" if load_in_4bit else None


def resolve_dtype(dtype: "str | torch.dtype | None") -> "torch.dtype | None":
    """None / "auto" keep each checkpoint tensor's dtype (transformers 5's default); names map to torch dtypes."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16', 'auto')")
    return resolved


def _place(model: nn.Module, placement: tuple | None) -> nn.Module:
    """Apply (device_map, max_memory): one device, a strategy ("auto") or a dict (distributed.device_map)."""
    if placement is None:
        return model
    from .distributed.device_map import place_model
    return place_model(model, *placement)


class _LowBitAutoModel:
    """Shared implementation; subclasses name the transformers auto class they mirror."""

    _auto_class = transformers.AutoModel

    @classmethod
    def _skeleton(cls, config, dtype: "torch.dtype | None", model_kwargs: dict) -> nn.Module:
        with parameters_on_meta():
            return cls._auto_class.from_config(config, **model_kwargs, **({"dtype": dtype} if dtype else {}))

    @staticmethod
    def _attach_generation_config(model: nn.Module, directory: Path) -> None:
        if (directory / "generation_config.json").is_file() and hasattr(model, "generation_config"):
            model.generation_config = transformers.GenerationConfig.from_pretrained(directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: "str | Path", *model_args,
                        load_in_4bit: bool = False, load_in_low_bit: "str | None" = None,
                        modules_to_not_convert: "list[str] | None" = None, cpu_embedding: bool = False,
                        optimize_model: bool = True, quantize_kv_cache: "bool | None" = None,
                        mixed_precision: bool = False, **kwargs) -> nn.Module:
        """transformers' from_pretrained, quantizing Linear layers while the checkpoint streams in.

        quantize_kv_cache=True (or IPEX_LLM_TF_QUANTIZE_KV_CACHE=1) makes generate() keep keys/values in fp8.
        mixed_precision=True (as in IPEX-LLM) quantizes lm_head, and the embedding tied to it, to sym_int8.
        """
        low_bit = resolve_low_bit(load_in_4bit, load_in_low_bit)
        if mixed_precision:
            if low_bit is None:
                raise ValueError("mixed_precision=True needs load_in_4bit=True or load_in_low_bit")
            check_mixed_precision(low_bit, modules_to_not_convert)
        if kwargs.get("gguf_file"):
            gguf = Path(pretrained_model_name_or_path) / kwargs.pop("gguf_file")
            # a GGUF keeps its own head (llama.cpp writes it in 8 or 6 bits), so mixed_precision has nothing to add
            return cls.from_gguf(gguf, low_bit=low_bit, modules_to_not_convert=modules_to_not_convert,
                                 cpu_embedding=cpu_embedding, optimize_model=optimize_model,
                                 quantize_kv_cache=quantize_kv_cache, **kwargs)[0]
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config = kwargs.get("config")
        if not isinstance(config, transformers.PreTrainedConfig):
            config = transformers.AutoConfig.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=kwargs.get("trust_remote_code", False), **hub)
        if quantization_field(config) is not None:
            return cls.load_low_bit(pretrained_model_name_or_path, optimize_model=optimize_model,
                                    quantize_kv_cache=quantize_kv_cache, **kwargs)
        if low_bit is None:
            if modules_to_not_convert is not None or cpu_embedding:
                raise ValueError("modules_to_not_convert / cpu_embedding need load_in_4bit=True or load_in_low_bit")
            return cls._auto_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if model_args:
            raise TypeError("positional model arguments are not supported with low-bit loading")
        return cls._quantize_on_load(pretrained_model_name_or_path, config, low_bit, modules_to_not_convert,
                                     cpu_embedding, optimize_model, kwargs, quantize_kv_cache, mixed_precision)

    @classmethod
    def _split_kwargs(cls, kwargs: dict) -> tuple[dict, dict, "torch.dtype | None", "tuple | None"]:
        kwargs = dict(kwargs)
        kwargs.pop("config", None)
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        model_kwargs = {k: kwargs.pop(k) for k in MODEL_KWARGS if k in kwargs}
        dtype = resolve_dtype(kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None))
        device_map, max_memory = kwargs.pop("device_map", None), kwargs.pop("max_memory", None)
        kwargs.pop("use_safetensors", None)
        kwargs.pop("low_cpu_mem_usage", None)
        if kwargs:
            raise TypeError(f"from_pretrained got arguments ipex_llm_tf does not support with low-bit loading: "
                            f"{sorted(kwargs)}")
        placement = None
        if device_map is not None or max_memory is not None:
            from .distributed.device_map import check_device_map_arg
            placement = (check_device_map_arg(device_map), max_memory)  # bad devices fail before loading
        return hub, model_kwargs, dtype, placement

    @classmethod
    def _quantize_on_load(cls, path, config, low_bit: str, modules_to_not_convert, cpu_embedding: bool,
                          optimize_model: bool, kwargs: dict, quantize_kv_cache: "bool | None" = None,
                          mixed_precision: bool = False) -> nn.Module:
        hub, model_kwargs, dtype, placement = cls._split_kwargs(kwargs)
        directory = resolve_checkpoint_dir(path, **{k: hub[k] for k in ("revision", "cache_dir", "token",
                                                                            "local_files_only") if k in hub})
        if "subfolder" in hub:
            directory = directory / hub["subfolder"]
        files = safetensors_files(directory)
        keep = resolve_modules_to_not_convert(modules_to_not_convert)
        model = cls._skeleton(config, dtype, model_kwargs)
        convert(model, low_bit, keep)
        if mixed_precision:
            quantize_head(model)
        filler = SkeletonFiller(model, dtype, str(directory))
        filler.feed_all(iter_tensors(files), count_tensors(files), desc=f"Quantizing to {low_bit}")
        filler.finish()
        cls._attach_generation_config(model, directory)
        model = finalize(model, low_bit, keep, cpu_embedding, optimize_model, quantize_kv_cache)
        return _place(model, placement)

    @classmethod
    def load_low_bit(cls, pretrained_model_name_or_path: "str | Path", optimize_model: bool = True,
                     quantize_kv_cache: "bool | None" = None, **kwargs) -> nn.Module:
        """Load a directory or Hub repo written by save_low_bit / push_to_hub."""
        hub, model_kwargs, dtype, placement = cls._split_kwargs(kwargs)
        directory = resolve_checkpoint_dir(pretrained_model_name_or_path, **{
            k: hub[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in hub})
        field = read_field(directory)
        config = transformers.AutoConfig.from_pretrained(directory, **model_kwargs)
        model = fill_low_bit(cls._skeleton(config, dtype, model_kwargs), directory, field, dtype)
        cls._attach_generation_config(model, directory)
        model = finalize(model, field["low_bit"], field.get("modules_to_not_convert", []),
                         field.get("cpu_embedding", False), optimize_model, quantize_kv_cache)
        return _place(model, placement)

    @classmethod
    def from_gguf(cls, gguf_path: "str | Path", low_bit: "str | None" = None, **kwargs) -> tuple[nn.Module, object]:
        """Load a .gguf file: (model, tokenizer); GGUF's own Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 tensors are kept as is."""
        from .gguf_loader import load_gguf_model
        return load_gguf_model(cls, gguf_path, low_bit, **kwargs)


class AutoModelForCausalLM(_LowBitAutoModel):
    """transformers.AutoModelForCausalLM with low-bit loading (load_in_4bit / load_in_low_bit / load_low_bit)."""

    _auto_class = transformers.AutoModelForCausalLM


class AutoModel(_LowBitAutoModel):
    """transformers.AutoModel with low-bit loading."""

    _auto_class = transformers.AutoModel
