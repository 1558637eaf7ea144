"""Low-bit checkpoints: safetensors only, written atomically, read back tensor by tensor.

A saved directory holds config.json (with the "ipex_llm_tf" field below), generation_config.json, one or more
*.safetensors files (with model.safetensors.index.json when sharded) and the tokenizer when one was given.

    config.json["ipex_llm_tf"] = {
        "quant_method": "ipex_llm_tf",      # what wrote it
        "format_version": 1,                # layout of this field and of the tensors; bumped on breaking changes
        "low_bit": "sym_int4",              # format of every LowBitLinear unless listed in layer_formats
        "layer_formats": {"model.layers.0.mlp.down_proj": "sym_int8"},   # per-layer exceptions (e.g. from GGUF)
        "modules_to_not_convert": ["lm_head"],
        "cpu_embedding": false,
        "formats": {"sym_int4": 1},         # version of every format used, checked on load
        "package_version": "0.1.0"
    }

The field is not called "quantization_config" on purpose: transformers rejects unknown quant methods there, which
would break `with low_memory_init(): Model.from_pretrained(saved_dir)` followed by `load_low_bit(model, saved_dir)`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from .formats import get_format

CONFIG_FIELD = "ipex_llm_tf"
FORMAT_VERSION = 1
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the model; the message names the file and the fix."""


def parse_size(size: "int | str") -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def quantization_field(config) -> dict | None:
    """The "ipex_llm_tf" field of a transformers config (or config dict), or None for a normal checkpoint."""
    field = config.get(CONFIG_FIELD) if isinstance(config, dict) else getattr(config, CONFIG_FIELD, None)
    return field if isinstance(field, dict) and field.get("quant_method") == "ipex_llm_tf" else None


def check_quantization_field(field: dict, where: str) -> None:
    """Raise CheckpointError if the field was written by a newer layout or names an unknown format."""
    if field.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{where} was saved with checkpoint format {field['format_version']}, newer than this "
                              f"ipex_llm_tf understands ({FORMAT_VERSION}); upgrade ipex-llm-tf.")
    for name, version in field.get("formats", {}).items():
        fmt = get_format(name)
        if version > fmt.version:
            raise CheckpointError(f"{where} stores {name} version {version}; this ipex_llm_tf reads up to "
                                  f"{fmt.version}. Upgrade ipex-llm-tf.")


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_checkpoint(directory: "str | Path", state: dict[str, torch.Tensor], config_dict: dict,
                     extra_files: "callable | None" = None, max_shard_size: "int | str" = DEFAULT_MAX_SHARD_BYTES,
                     ) -> Path:
    """Write tensors + config into a temporary sibling directory, then rename it into place.

    An interrupted save leaves only a hidden ".<name>.tmp-*" directory, never a half-written loadable one; an
    existing directory is replaced only once the new one is complete. `extra_files(tmp_dir)` may add more files
    (generation config, tokenizer) before the rename.
    """
    target = Path(directory).resolve()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save to {target}: it exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        cpu_state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        shards = _shard(cpu_state, parse_size(max_shard_size))
        metadata = {"format": "pt", CONFIG_FIELD: json.dumps(quantization_field(config_dict) or {})}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFE_SINGLE), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=metadata)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in cpu_state.values())
            (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str))
        if extra_files is not None:
            extra_files(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def safetensors_files(directory: "str | Path") -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order; CheckpointError if there are none."""
    directory = Path(directory)
    index = directory / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err}); re-save the checkpoint") from err
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}; the download or save was "
                                  f"incomplete")
        return [directory / f for f in files]
    if (directory / SAFE_SINGLE).is_file():
        return [directory / SAFE_SINGLE]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = (f" It holds pickle files ({', '.join(pickles[:3])}); ipex_llm_tf never loads pickles implicitly: "
            f"load the model once with transformers and save it with save_pretrained(safe_serialization=True)."
            if pickles else "")
    raise CheckpointError(f"no .safetensors files in {directory}.{hint}")


_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, offset of the data section) of a safetensors file; CheckpointError if it is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if length <= 0 or 8 + length > size:
            raise CheckpointError(f"cannot read {path}: header of {length} bytes in a {size}-byte file. The file is "
                                  f"truncated or corrupt; download or save it again.")
        try:
            header = json.loads(handle.read(length))
        except ValueError as err:
            raise CheckpointError(f"cannot read {path}: its header is not JSON ({err}). The file is truncated or "
                                  f"corrupt; download or save it again.") from err
    header.pop("__metadata__", None)
    data_start = 8 + length
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry.get("dtype") not in _SAFE_DTYPES or data_start + end > size or begin > end:
            raise CheckpointError(f"cannot read {path}: tensor {name} lies outside the file or has dtype "
                                  f"{entry.get('dtype')}. The file is truncated or corrupt; download or save it again.")
    return header, data_start


# A slice of a stored 2-D tensor to read instead of all of it: (dim, start, stop), dim 0 = rows, 1 = columns
TensorSlice = tuple[int, int, int]
SLICE_CHUNK_BYTES = 16 * 1024**2  # column slices read this many bytes of whole rows at a time


def _read_slice(handle, path: Path, name: str, offset: int, entry: dict, where: TensorSlice) -> torch.Tensor:
    """Read rows [start, stop) with one read, or columns [start, stop) through a bounded buffer of whole rows."""
    dim, start, stop = where
    dtype = _SAFE_DTYPES[entry["dtype"]]
    shape = list(entry["shape"])
    if len(shape) == 1 and dim == 0:  # a bias: read it as a column
        return _read_slice(handle, path, name, offset, {**entry, "shape": shape + [1]}, where).reshape(-1)
    if len(shape) != 2 or dim not in (0, 1) or not 0 <= start < stop <= shape[dim]:
        raise CheckpointError(f"cannot read {name}[{start}:{stop}] along dim {dim} of {path}: the tensor has shape "
                              f"{shape}; the checkpoint does not match the model's layout")
    row_bytes = shape[1] * dtype.itemsize
    if dim == 0:
        buffer = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        handle.seek(offset + start * row_bytes)
        if handle.readinto(memoryview(buffer.numpy())) != buffer.numel():
            raise CheckpointError(f"cannot read {path}: tensor {name} is cut short. The file is truncated or corrupt; "
                                  f"download or save it again.")
        return buffer.view(dtype).reshape(stop - start, shape[1])
    out = torch.empty(shape[0], stop - start, dtype=dtype)
    rows = max(1, SLICE_CHUNK_BYTES // max(row_bytes, 1))
    staging = torch.empty(min(rows, shape[0]) * row_bytes, dtype=torch.uint8)
    for r0 in range(0, shape[0], rows):
        r = min(rows, shape[0] - r0)
        view = memoryview(staging.numpy())[: r * row_bytes]
        handle.seek(offset + r0 * row_bytes)
        if handle.readinto(view) != r * row_bytes:
            raise CheckpointError(f"cannot read {path}: tensor {name} is cut short. The file is truncated or corrupt; "
                                  f"download or save it again.")
        out[r0:r0 + r] = staging[: r * row_bytes].view(dtype).reshape(r, shape[1])[:, start:stop]
    return out


def iter_tensors(files: list[Path], select: Callable[[str, list[int]], TensorSlice | None] | None = None,
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time from safetensors files.

    Each tensor is read into its own buffer with plain file reads rather than memory-mapped, so a consumed
    tensor's pages leave the process with it and peak RSS stays near one tensor above what the model holds.
    `select(name, shape)` may return a (dim, start, stop) slice of a 1-D or 2-D tensor to read only that part (a tensor
    parallel rank's shard); column slices never hold more than SLICE_CHUNK_BYTES of the full tensor.
    """
    for path in files:
        header, data_start = read_header(path)
        with open(path, "rb", buffering=0) as handle:
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                begin, end = entry["data_offsets"]
                where = select(name, list(entry["shape"])) if select is not None else None
                if where is not None:
                    yield name, _read_slice(handle, path, name, data_start + begin, entry, where)
                    continue
                buffer = torch.empty(end - begin, dtype=torch.uint8)
                handle.seek(data_start + begin)
                if handle.readinto(memoryview(buffer.numpy())) != end - begin:
                    raise CheckpointError(f"cannot read {path}: tensor {name} is cut short. The file is truncated "
                                          f"or corrupt; download or save it again.")
                dtype = _SAFE_DTYPES[entry["dtype"]]
                yield name, buffer.view(dtype).reshape(entry["shape"])


def count_tensors(files: list[Path]) -> int:
    """Number of tensors across files (reads headers only)."""
    return sum(len(read_header(path)[0]) for path in files)
