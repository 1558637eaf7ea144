"""The contract every low-bit weight format implements, and the input checks they share."""
from __future__ import annotations

import torch

Parts = dict[str, torch.Tensor]
PartSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]

SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FormatError(ValueError):
    """A weight cannot be stored in the requested format; the message says why and what to do."""


class LowBitFormat:
    """A weight format: how an [out, in] float matrix becomes a few plain tensors and back.

    Subclasses set the class attributes and implement `part_specs`, `quantize` and `dequantize`;
    those with a GGUF twin also implement `to_gguf_blocks` / `from_gguf_blocks`.
    """

    name: str = ""
    block_size: int = 1          # in_features must be a multiple of this
    bits_per_weight: float = 0.0  # storage cost, scales and mins included
    gguf_type: int | None = None  # gguf.GGMLQuantizationType value where a lossless GGUF twin exists
    version: int = 1              # bumped when the stored layout changes; recorded in checkpoints
    description: str = ""         # one line for the format table

    def part_specs(self, out_features: int, in_features: int) -> PartSpecs:
        """Shape and dtype of every stored tensor for a weight of this size."""
        raise NotImplementedError

    def quantize(self, weight: torch.Tensor) -> Parts:
        """Pack a float [out, in] weight into this format's tensors (on the weight's device)."""
        raise NotImplementedError

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rebuild the [out, in] weight in `dtype` from the packed tensors."""
        raise NotImplementedError

    def quantize_in_row_chunks(self, weight: torch.Tensor, max_elements: int = 1 << 22) -> Parts:
        """quantize(), a band of rows at a time: the same tensors, with float temporaries bounded by max_elements.

        Quantizing a 49152 x 576 vocabulary table at once holds several float32 copies of it (~0.5 GB); every format
        works per row (its parts have one row per output feature), so bands give identical bytes.
        """
        if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0 or weight.shape[1] % self.block_size:
            return self.quantize(weight)  # which says what is wrong with the weight
        rows = max(1, max_elements // weight.shape[1])
        row_wise = all(shape[0] == weight.shape[0] for shape, _ in self.part_specs(*weight.shape).values())
        if not row_wise or weight.shape[0] <= rows:
            return self.quantize(weight)
        bands = [self.quantize(weight[start:start + rows]) for start in range(0, weight.shape[0], rows)]
        return {name: torch.cat([band[name] for band in bands]) for name in bands[0]}

    def to_gguf_blocks(self, parts: Parts) -> torch.Tensor:
        """GGUF block bytes [out, in / block_size * type_size] (uint8) of the packed tensors."""
        raise NotImplementedError(f"format {self.name!r} has no GGUF counterpart")

    def from_gguf_blocks(self, raw: torch.Tensor, out_features: int, in_features: int) -> Parts:
        """Packed tensors from GGUF block bytes, with no re-quantization."""
        raise NotImplementedError(f"format {self.name!r} has no GGUF counterpart")

    def empty_parts(self, out_features: int, in_features: int, device: torch.device | str = "cpu") -> Parts:
        """Uninitialised tensors with this format's layout (for skeletons that are filled later)."""
        return {k: torch.empty(shape, dtype=dt, device=device)
                for k, (shape, dt) in self.part_specs(out_features, in_features).items()}

    def check_shape(self, out_features: int, in_features: int, where: str = "weight") -> None:
        """Raise FormatError when a weight of this size cannot be stored in this format."""
        if out_features <= 0 or in_features <= 0:
            raise FormatError(f"{where}: empty weight of shape ({out_features}, {in_features}) cannot be "
                              f"quantized to {self.name}; remove the layer or keep it in full precision.")
        if in_features % self.block_size:
            raise FormatError(
                f"{where}: in_features={in_features} is not a multiple of {self.name}'s block size "
                f"{self.block_size}; keep this layer in full precision (convert() does so with a warning, "
                f"or name it in modules_to_not_convert).")

    def check_weight(self, weight: torch.Tensor, where: str = "weight") -> None:
        """Raise FormatError for a weight this format cannot store: wrong rank/dtype, empty, NaN/Inf."""
        if weight.dim() != 2:
            raise FormatError(f"{where}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
        if weight.dtype not in SUPPORTED_WEIGHT_DTYPES:
            raise FormatError(f"{where}: weight dtype {weight.dtype} is not supported; cast it to float32, "
                              f"float16 or bfloat16 first.")
        self.check_shape(weight.shape[0], weight.shape[1], where)
        if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
            raise FormatError(f"{where}: weight contains NaN or Inf; the checkpoint is corrupt or the layer "
                              f"diverged. Fix the weights or keep the layer out with modules_to_not_convert.")

    def __repr__(self) -> str:
        return f"<format {self.name}: {self.bits_per_weight:g} bits/weight, block {self.block_size}>"


class DtypeFormat(LowBitFormat):
    """A format whose elements are one torch dtype (fp16 / bf16, fp8): registered once per dtype, no blocks."""

    block_size = 1
    version = 1
    gguf_type = None

    def __init__(self, name: str, dtype: torch.dtype, description: str) -> None:
        self.name = name
        self.dtype = dtype
        self.description = description
