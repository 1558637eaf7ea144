"""The part of a GGUF file that importing its tensors needs: a few metadata values and the tensor table.

gguf-py's GGUFReader turns every metadata value into numpy views up front: for SmolLM2's 49k-token vocabulary that
is ~2.4 s and ~160 MiB, spent before a single tensor is read. This walks the header with struct instead, keeping
scalar and string values and stepping over arrays, and maps the tensor data (read-only) for GgufCheckpoint.
"""
from __future__ import annotations

import mmap
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# numpy views of the unquantized types; every other type is read as its block bytes
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
          GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table."""

    name: str
    tensor_type: GGMLQuantizationType
    dims: tuple[int, ...]  # ggml order: innermost (ne[0], in_features) first
    data_offset: int       # from the start of the file
    n_bytes: int


class _Cursor:
    """Little-endian reads from a buffer, advancing; a read past the end raises ValueError."""

    def __init__(self, buffer: Any) -> None:
        self.buffer, self.pos = buffer, 0

    def scalar(self, code: str) -> Any:
        value = struct.unpack_from("<" + code, self.buffer, self.pos)[0]
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> str:
        size = self.scalar("Q")
        if self.pos + size > len(self.buffer):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.buffer[self.pos:self.pos + size]).decode("utf-8", errors="replace")
        self.pos += size
        return text

    def value(self, kind: int) -> Any:
        """A metadata value; arrays are stepped over (None), as importing tensors needs none of them."""
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self.scalar("I"), self.scalar("Q")
        if item in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[item])
        else:
            for _ in range(count):
                self.value(item)
        return None


class GgufHeader:
    """Metadata scalars and strings, the tensor table, and the file's data mapped read-only."""

    def __init__(self, path: pathlib.Path) -> None:
        with open(path, "rb") as file:
            self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError for an empty file
        try:
            self._parse()
        except struct.error as err:
            raise ValueError(f"the header is truncated ({err})") from err

    def _parse(self) -> None:
        cursor = _Cursor(self.map)
        if bytes(self.map[:4]) != _MAGIC:
            raise ValueError("no GGUF magic at the start")
        cursor.pos = 4
        version = cursor.scalar("I")
        # a file written on a big-endian host reads as a version with its low half zero here
        self.little_endian = bool(version & 0xFFFF)
        if not self.little_endian:
            self.metadata: dict[str, Any] = {}
            self.tensors: list[TensorInfo] = []
            return
        if version not in _VERSIONS:
            raise ValueError(f"GGUF version {version} is not one of {_VERSIONS}")
        n_tensors, n_values = cursor.scalar("Q"), cursor.scalar("Q")
        self.metadata = {}
        for _ in range(n_values):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.scalar("I"))
        table = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = tuple(cursor.scalar("Q") for _ in range(cursor.scalar("I")))
            table.append((name, dims, cursor.scalar("I"), cursor.scalar("Q")))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors = []
        for name, dims, type_id, offset in table:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise ValueError(f"tensor {name!r} has unknown GGML type {type_id}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            elements = int(np.prod(dims, dtype=np.int64))
            info = TensorInfo(name, qtype, dims, data_start + offset, elements // block * type_size)
            if info.data_offset + info.n_bytes > len(self.map):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            self.tensors.append(info)

    def data(self, info: TensorInfo) -> np.ndarray:
        """A read-only view of one tensor's data: typed for plain types, else [..., row bytes] uint8 blocks."""
        shape = tuple(reversed(info.dims))
        plain = _PLAIN.get(info.tensor_type)
        if plain is not None:
            count = info.n_bytes // np.dtype(plain).itemsize
            return np.frombuffer(self.map, plain, count, info.data_offset).reshape(shape)
        block, type_size = GGML_QUANT_SIZES[info.tensor_type]
        rows = shape[:-1] + (shape[-1] // block * type_size,)
        return np.frombuffer(self.map, np.uint8, info.n_bytes, info.data_offset).reshape(rows)
