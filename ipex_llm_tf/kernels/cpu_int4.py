"""CPU matmul for the ggml integer formats through PyTorch's packed int4 kernel (bf16 activations).

`aten._weight_int4pack_mm_for_cpu` computes x @ ((q - 8) * scale + zero) per group of 32 inputs, with q in 0..15.
Q4_0 / Q4_1 map onto one such plane losslessly; Q5_* and Q8_0 split each integer code into a high and a low
nibble and so become the sum of two planes. Scales and zeros are rounded to bf16 by the kernel's contract:
that, and bf16 activations, bound the difference to the float32 reference (see tests/test_low_bit_linear.py).
"""
from __future__ import annotations

import torch

from ..formats import LowBitFormat, Parts

GROUP = 32
INT4_FORMATS = ("sym_int4", "asym_int4", "sym_int5", "asym_int5", "sym_int8")

Plane = tuple[torch.Tensor, torch.Tensor]  # (packed weight, scales_and_zeros [K/32, N, 2] bf16)


def supports(fmt: LowBitFormat, out_features: int) -> bool:
    """Whether the packed int4 kernel can run this layer (it needs N % 16 == 0)."""
    return fmt.name in INT4_FORMATS and out_features % 16 == 0


def _unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 in ggml in-block order -> [N, K] int32 values 0..15 in natural order."""
    n = qweight.shape[0]
    blocks = qweight.view(n, -1, GROUP // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(n, -1).to(torch.int32)


def _unpack_high_bits(qhigh: torch.Tensor) -> torch.Tensor:
    """[N, K/8] uint8 (ggml's little-endian qh per block) -> [N, K] int32 bits."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qhigh.device)
    return ((qhigh.unsqueeze(-1) >> shifts) & 1).reshape(qhigh.shape[0], -1).to(torch.int32)


def _plane(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Plane:
    """Pack one plane of 0..15 codes with per-group scale and zero ([N, K/32] float32 each)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


# Rows packed per step: the int32 code temporaries of a 49152-row vocabulary head would otherwise add ~400 MB to the
# process peak. A multiple of 64: the kernel packs rows in blocks of 64, so chunks of that size give identical bytes.
ROW_CHUNK = 2048


def pack_planes(fmt: LowBitFormat, parts: Parts) -> list[Plane]:
    """Express a ggml-format weight as one or two affine int4 planes for the CPU kernel, a chunk of rows at a time."""
    rows = next(iter(parts.values())).shape[0]
    chunks = [_pack_rows(fmt, {name: part[start:start + ROW_CHUNK] for name, part in parts.items()})
              for start in range(0, rows, ROW_CHUNK)]
    return [(torch.cat([chunk[i][0] for chunk in chunks]), torch.cat([chunk[i][1] for chunk in chunks], dim=1))
            for i in range(len(chunks[0]))]


def _pack_rows(fmt: LowBitFormat, parts: Parts) -> list[Plane]:
    d = parts["scales"].float()
    mins = parts["mins"].float() if "mins" in parts else None
    if fmt.name == "sym_int8":
        q = parts["qweight"].to(torch.int32)               # -128..127
        high, low = torch.div(q, 16, rounding_mode="floor"), q & 15
        # d*q = 16d*((high+8)-8) + d*(low-8) + 8d
        return [_plane(high + 8, 16 * d, torch.zeros_like(d)), _plane(low, d, 8 * d)]
    low = _unpack_nibbles(parts["qweight"])
    if "qhigh" not in parts:                                # Q4_0: d*(q-8); Q4_1: d*q + m = d*(q-8) + 8d + m
        zero = 8 * d + mins if mins is not None else torch.zeros_like(d)
        return [_plane(low, d, zero)]
    high = _unpack_high_bits(parts["qhigh"])                # Q5_*: code = 16*high + low
    base = mins if mins is not None else -16 * d            # Q5_0 value is d*(code-16); Q5_1 is d*code + m
    return [_plane(high + 8, 16 * d, torch.zeros_like(d)), _plane(low, d, 8 * d + base)]


def matmul_planes(x: torch.Tensor, planes: list[Plane], out_features: int) -> torch.Tensor:
    """x [M, K] -> [M, N], summing the planes' products."""
    xb = x.to(torch.bfloat16)
    products = [torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, GROUP, sz) for packed, sz in planes]
    if len(products) == 1:
        return products[0]
    # two planes carry a coarse and a fine part of one weight: add them in float32 so the fine part survives
    return products[0].float().add_(products[1].float())
