"""Which part of each packed tensor a tensor-parallel rank keeps; pure index arithmetic, no process group needed.

Every format stores a weight [N out, K in] as row-wise tensors ([N, ...]). A column-parallel shard (a slice of output
channels) is therefore a slice of rows of every part. A row-parallel shard (a slice of input channels) is a slice of
columns of every part whose width grows with K, taken at block boundaries so each rank's blocks are whole blocks of
the original; parts that do not depend on K (fp8's per-output-channel scale) are the same on every rank.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..formats import LowBitFormat, Parts
from ..serialization import TensorSlice


class ShardingError(ValueError):
    """A weight cannot be split across the requested number of ranks; the message says why and what to do."""


def local_size(total: int, world_size: int, what: str) -> int:
    """total / world_size, or ShardingError when it does not divide evenly."""
    if world_size < 1:
        raise ShardingError(f"world size must be at least 1, got {world_size}")
    if total % world_size:
        options = [n for n in range(1, total + 1) if total % n == 0]
        raise ShardingError(f"world size {world_size} does not divide {what} ({total}); launch with a number of "
                            f"ranks among {options}")
    return total // world_size


def column_ranges(sections: Sequence[int], rank: int, world_size: int, where: str) -> list[tuple[int, int]]:
    """Row ranges a column-parallel rank keeps: its share of each section (q, k, v or gate, up), in order."""
    ranges, offset = [], 0
    for size in sections:
        share = local_size(size, world_size, f"the {size} output features of a section of {where}")
        ranges.append((offset + rank * share, offset + (rank + 1) * share))
        offset += size
    return ranges


def row_part_slices(fmt: LowBitFormat, out_features: int, in_features: int, rank: int, world_size: int,
                    where: str) -> dict[str, TensorSlice | None]:
    """Per stored part of a row-parallel weight: the column slice this rank keeps (None: the whole part)."""
    local_in = local_size(in_features, world_size, f"the {in_features} input features of {where}")
    if local_in % fmt.block_size:
        raise ShardingError(
            f"{where}: splitting {in_features} input features over {world_size} ranks gives {local_in} per rank, "
            f"which would cut {fmt.name}'s blocks of {fmt.block_size}; use fewer ranks, or a checkpoint in a format "
            f"with smaller blocks (sym_int4, sym_int8 and the other ggml formats use 32)")
    full = fmt.part_specs(out_features, in_features)
    local = fmt.part_specs(out_features, local_in)
    slices: dict[str, TensorSlice | None] = {}
    for name, (shape, _) in full.items():
        local_shape = local[name][0]
        if len(shape) != 2 or shape[0] != out_features:
            raise ShardingError(f"{where}: {fmt.name} tensor {name!r} of shape {tuple(shape)} is not stored row by "
                                f"row, so it cannot be split along input channels")
        if local_shape[1] == shape[1]:
            slices[name] = None
        elif local_shape[1] * world_size == shape[1]:
            slices[name] = (1, rank * local_shape[1], (rank + 1) * local_shape[1])
        else:
            raise ShardingError(f"{where}: {fmt.name} tensor {name!r} ({shape[1]} columns) does not split into "
                                f"{world_size} equal column blocks")
    return slices


def take_rows(tensor: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The given row ranges of a tensor, concatenated into a new contiguous tensor."""
    return torch.cat([tensor[a:b] for a, b in ranges]).contiguous()


def take_slice(tensor: torch.Tensor, where: TensorSlice | None) -> torch.Tensor:
    """tensor[start:stop] along dim as a new contiguous tensor, or the tensor itself for None."""
    if where is None:
        return tensor
    dim, start, stop = where
    return tensor.narrow(dim, start, stop - start).contiguous()


def column_shard_parts(parts: Parts, ranges: Sequence[tuple[int, int]]) -> Parts:
    """A column-parallel rank's packed tensors: the same rows of every part."""
    return {name: take_rows(part, ranges) for name, part in parts.items()}


def row_shard_parts(parts: Parts, slices: dict[str, TensorSlice | None]) -> Parts:
    """A row-parallel rank's packed tensors: each part's column slice (or the whole part)."""
    return {name: take_slice(part, slices[name]) for name, part in parts.items()}
