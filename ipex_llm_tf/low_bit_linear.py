"""LowBitLinear and LowBitEmbedding: modules whose weight lives as a low-bit format's packed tensors (plain buffers)."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .formats import LowBitFormat, Parts, get_format
from .kernels import PackedCache, cpu_int4_fits, cpu_int4_linear, low_bit_linear, low_bit_linear_silu, ops


# per conversion function of one .to() / .cuda() / _apply() call: id(source tensor) -> (source, moved tensor)
_MOVED: "weakref.WeakKeyDictionary[object, dict[int, tuple[torch.Tensor, torch.Tensor]]]" = weakref.WeakKeyDictionary()


class PackedWeight(nn.Module):
    """Holds one [rows, cols] weight as a format's packed buffers; .to(dtype) never re-casts them."""

    def __init__(self, rows: int, cols: int, low_bit: "str | LowBitFormat", device: "torch.device | str | None",
                 name: str) -> None:
        super().__init__()
        fmt = get_format(low_bit)
        fmt.check_shape(rows, cols, where=name or type(self).__name__)
        self.fmt = fmt
        self._part_names = tuple(fmt.part_specs(rows, cols))
        self._rows, self._cols = rows, cols
        for part_name, tensor in fmt.empty_parts(rows, cols, device or "cpu").items():
            self.register_buffer(part_name, tensor)

    @property
    def low_bit(self) -> str:
        """The name of the stored format."""
        return self.fmt.name

    @property
    def parts(self) -> Parts:
        """The packed tensors, by the names the format defines."""
        return {name: self._buffers[name] for name in self._part_names}

    def load_parts(self, parts: Parts) -> None:
        """Adopt already-quantized tensors (from a checkpoint, a GGUF file, another layer) as this module's buffers."""
        expected = self.fmt.part_specs(self._rows, self._cols)
        if set(parts) != set(expected):
            raise ValueError(f"{self.fmt.name} expects tensors {sorted(expected)}, got {sorted(parts)}")
        for part_name, (shape, dtype) in expected.items():
            tensor = parts[part_name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{self.fmt.name} tensor {part_name!r} should be {tuple(shape)} {dtype}, "
                                 f"got {tuple(tensor.shape)} {tensor.dtype}")
            self._buffers[part_name] = tensor
        self._forget_derived()

    def _forget_derived(self) -> None:
        cache = getattr(self, "_packed_cache", None)
        if cache is not None:
            cache.invalidate()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # copies into the buffers in place
        self._forget_derived()

    def _apply(self, fn, recurse: bool = True):
        # model.to(dtype) / .half() must move packed tensors but never re-cast them: their dtype is the format.
        # Packed tensors shared between modules (a tied embedding and head) must stay shared: nn.Module.to() calls
        # every module's _apply with one `fn`, so the tensors already moved under that fn are looked up, not copied.
        try:
            moved = _MOVED.setdefault(fn, {})
        except TypeError:  # a conversion callable that takes no weak reference: sharing is not tracked for it
            moved = {}
        packed = {name: self._buffers.pop(name) for name in self._part_names}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, before in packed.items():
                self._buffers[name] = before
        for name, before in packed.items():
            if id(before) not in moved:
                after = fn(before)
                # the source stays referenced while fn lives, so its id cannot be reused by a new tensor meanwhile
                moved[id(before)] = (before, after if after.dtype == before.dtype else before.to(after.device))
            self._buffers[name] = moved[id(before)][1]
        self._forget_derived()
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [rows, cols] weight this module computes with, in `dtype`."""
        return self.fmt.dequantize(self.parts, dtype=dtype)


class LowBitLinear(PackedWeight):
    """A Linear layer storing its weight in a low-bit format; forward dispatches by device (see kernels)."""

    def __init__(self, in_features: int, out_features: int, low_bit: "str | LowBitFormat", bias: bool = True,
                 device: "torch.device | str | None" = None, dtype: torch.dtype | None = None,
                 name: str = "") -> None:
        super().__init__(out_features, in_features, low_bit, device, name)
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._packed_cache = PackedCache()

    @classmethod
    def from_linear(cls, linear: nn.Linear, low_bit: "str | LowBitFormat", name: str = "") -> "LowBitLinear":
        """Quantize an nn.Linear's weight (on its own device) into a new LowBitLinear."""
        fmt = get_format(low_bit)
        weight = linear.weight.detach()
        fmt.check_weight(weight, where=name or "Linear")
        layer = cls(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None,
                    device="meta", dtype=linear.bias.dtype if linear.bias is not None else None, name=name)
        layer.load_parts(fmt.quantize_in_row_chunks(weight), bias=linear.bias)
        return layer

    def load_parts(self, parts: Parts, bias: torch.Tensor | None = None) -> None:
        """Adopt packed tensors (and optionally a bias) as this layer's weight."""
        super().load_parts(parts)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LowBitLinear expected input with last dim {self.in_features}, got {tuple(x.shape)}")
        planes = self._packed_cache.cpu_planes
        # CPU decode runs ~120 of these per token: once the int4 planes exist, skip the general dispatch (under
        # torch.compile this is one aten op in the graph, with no Python left around it)
        if planes is not None and x.is_cpu and cpu_int4_fits(x, planes):
            return cpu_int4_linear(x, planes, self.bias, self.out_features)
        if torch.compiler.is_compiling():
            return ops.low_bit_linear_op(x, [self._buffers[name] for name in self._part_names],
                                         ",".join(self._part_names), self.fmt.name, self.out_features, self.bias)
        return low_bit_linear(x, self.fmt, self.parts, self.bias, self.out_features, self._packed_cache)

    def silu_and_mul_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """SiLU(gate) * up of this layer's output, for a merged [gate | up] projection, as one kernel where one
        exists (decode rows on a GPU); None otherwise."""
        if torch.compiler.is_compiling() or x.shape[-1] != self.in_features:
            return None
        return low_bit_linear_silu(x, self.fmt, self.parts, self.bias, self.out_features, self._packed_cache)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, low_bit={self.fmt.name}, "
                f"bias={self.bias is not None}")


class LowBitEmbedding(PackedWeight):
    """An embedding table kept in a row-wise low-bit format: a lookup gathers packed rows and dequantizes only them.

    It can share its buffers with a tied LowBitLinear head, so a GGUF's Q8_0 token table serves both, stored once.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, low_bit: "str | LowBitFormat",
                 padding_idx: int | None = None, device: "torch.device | str | None" = None, name: str = "") -> None:
        super().__init__(num_embeddings, embedding_dim, low_bit, device, name)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.output_dtype = torch.float32

    def _apply(self, fn, recurse: bool = True):
        probe = fn(torch.empty(0, dtype=self.output_dtype))
        if probe.is_floating_point():
            self.output_dtype = probe.dtype  # follow model.to(dtype) for what the lookup returns
        return super()._apply(fn, recurse)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[...] token ids -> [..., embedding_dim] vectors in the model's dtype."""
        flat = input_ids.reshape(-1).to(self._buffers[self._part_names[0]].device)
        rows = {name: part.index_select(0, flat) for name, part in self.parts.items()}
        return self.fmt.dequantize(rows, dtype=self.output_dtype).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, low_bit={self.fmt.name}"


class CPULowBitEmbedding(LowBitEmbedding):
    """cpu_embedding=True for a packed table: it and its lookup stay on the CPU; outputs go where the model moved."""

    output_device: torch.device = torch.device("cpu")

    @classmethod
    def from_embedding(cls, embedding: LowBitEmbedding) -> "CPULowBitEmbedding":
        """Give the table its own CPU copy of the packed tensors (a tied head keeps the originals and moves)."""
        new = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.fmt, padding_idx=embedding.padding_idx,
                  device="meta")
        new.load_parts({name: part.detach().to("cpu").clone() for name, part in embedding.parts.items()})
        new.output_dtype = embedding.output_dtype
        new.output_device = next(iter(embedding.parts.values())).device  # where the model's other weights are
        return new

    def _apply(self, fn, recurse: bool = True):
        probe = fn(torch.empty(0, dtype=self.output_dtype))
        self.output_device = probe.device
        if probe.is_floating_point():
            self.output_dtype = probe.dtype
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[...] token ids (any device) -> [..., embedding_dim] vectors on the model's device."""
        return super().forward(input_ids).to(self.output_device)
