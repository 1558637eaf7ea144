"""Peer rows for benchmarks/bench_gpu.py, built in the same process as ours: the ones ../shared/anchors measured.

- transformers fp16 with its static cache, which generate() compiles (torch.compile, CUDA graphs) on its own;
- PyTorch's own int4 weight-only kernel (`aten._weight_int4pack_mm`, the kernel torchao's int4 layout calls) on
  every Linear, group 128, asymmetric, bf16 activations, with the same static cache + compile.
- torchao's int4 weight-only quantization (`Int4WeightOnlyConfig`, group 128, tinygemm's packed layout) on a bf16
  copy, with the same static cache + compile, as ../shared/anchors measured it. It needs the torchao wheel: without
  it the row reports the ImportError.
bitsandbytes needs a wheel the device lacks; its figures are in ../shared/anchors/results-h100.json.
"""
from __future__ import annotations

import torch
from torch import nn

INT4_GROUP = 128


def _int4_codes(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes [N, K] (uint8 0..15) with per-group scale and minimum [N, K/group]."""
    n, k = weight.shape
    grouped = weight.float().reshape(n, k // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-8)
    codes = ((grouped - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return codes.reshape(n, k), scale, low


class Int4PackLinear(nn.Module):
    """y = x @ W.T through aten._weight_int4pack_mm; W = (q - 8) * scale + zero per group of 128 inputs."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP) -> None:
        super().__init__()
        codes, scale, low = _int4_codes(linear.weight.detach(), group)
        self.group, self.out_features = group, linear.out_features
        self.out_dtype = linear.weight.dtype
        # the kernel's zero is the value of code 8: q * scale + low == (q - 8) * scale + (low + 8 * scale)
        zero = low + 8 * scale
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())
        self.register_buffer("packed", self._pack(codes))
        self.bias = linear.bias
        self._check(linear.weight.detach(), codes, scale, low)

    def _pack(self, codes: torch.Tensor, high_first: bool = True) -> torch.Tensor:
        pairs = codes.view(codes.shape[0], -1, 2)
        first, second = (pairs[..., 0], pairs[..., 1]) if high_first else (pairs[..., 1], pairs[..., 0])
        return torch.ops.aten._convert_weight_to_int4pack((first << 4 | second).contiguous(), 8)

    def _check(self, weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        """The kernel must reproduce the dequantized weight; the nibble order of its packing varies by release."""
        n, k = weight.shape
        probe = torch.eye(k, device=weight.device, dtype=torch.bfloat16)[:256]
        want = (codes.float().reshape(n, -1, self.group) * scale[..., None] + low[..., None]).reshape(n, k)[:, :256].t()
        for high_first in (True, False):
            self.packed = self._pack(codes, high_first)
            got = torch.ops.aten._weight_int4pack_mm(probe, self.packed, self.group, self.scales_and_zeros).float()
            if (got - want).abs().max() <= 0.02 * want.abs().max():
                return
        raise RuntimeError("aten._weight_int4pack_mm does not reproduce the weights with either nibble order")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., K] -> [..., N]."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scales_and_zeros)
        y = y.to(self.out_dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def to_int4pack(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear (lm_head included, as torchao's quantize_ does) with an Int4PackLinear, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.in_features % INT4_GROUP == 0:
                setattr(module, child_name, Int4PackLinear(child))
                del child
    device = next(model.parameters()).device
    if device.type in ("cuda", "xpu"):
        getattr(torch, device.type).empty_cache()
    return model


def to_torchao_int4(model: nn.Module) -> nn.Module:
    """torchao's int4 weight-only quantization of every Linear (lm_head included), on the model cast to bf16."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    model = model.to(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    return model
