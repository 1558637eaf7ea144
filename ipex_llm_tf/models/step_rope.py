"""RoPE's cos / sin for a graph decode step: one kernel (kernels.rope_angles) where the model's rotary embedding
has fixed frequencies and that kernel runs on the device, else the embedding itself.

transformers' rotary embeddings spend ~9 small kernels on a step's few positions; on an H100 the one kernel took a
7B sym_int4 step from 2.0151 to 1.9983 ms (docs/gpu-log.md, session 22). Dynamic rope types ("dynamic",
"longrope") change their frequencies with the length, so they keep the embedding's own forward.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels


def fixed_frequencies(rotary: nn.Module) -> "tuple[torch.Tensor, float] | None":
    """(inv_freq, attention_scaling) of a transformers rotary embedding whose frequencies never change, else None."""
    rope_type = getattr(rotary, "rope_type", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    scaling = getattr(rotary, "attention_scaling", None)
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        return None
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or not isinstance(scaling, (int, float)):
        return None
    return inv_freq, float(scaling)


# positions the one-time check compares the kernel at, against the embedding (the last past any 7B context)
_CHECK_POSITIONS = (0, 1, 2, 17, 1000, 4095, 65535)


class StepRope:
    """Callable as the rotary embedding is, (hidden, positions) -> (cos, sin), for graph decode steps."""

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        self.agrees: dict[tuple, bool] = {}  # (device, dtype) -> whether the kernel matched the embedding there

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [batch, seq, head_dim] for positions [batch, seq], in hidden's dtype."""
        fixed = fixed_frequencies(self.rotary)
        if fixed is None or kernels.op_backend("rope_angles", hidden.device) != "triton" \
                or not self._agrees(fixed, hidden):
            return self.rotary(hidden, positions)
        inv_freq, scaling = fixed
        return kernels.rope_angles(positions, inv_freq.float(), scaling, hidden.dtype)

    def _agrees(self, fixed: tuple[torch.Tensor, float], hidden: torch.Tensor) -> bool:
        """Whether the kernel gives the embedding's values (within two units in the last place) on this device and
        dtype: checked once, on the eager warm-up step that precedes every capture, so a rotary module that
        computes something else keeps its own forward."""
        key = (hidden.device, hidden.dtype)
        if key not in self.agrees:
            positions = torch.tensor([_CHECK_POSITIONS], device=hidden.device)
            want = self.rotary(hidden, positions)
            got = kernels.rope_angles(positions, fixed[0].float(), fixed[1], hidden.dtype)
            bound = 2 * torch.finfo(hidden.dtype).eps * max(1.0, abs(fixed[1]))
            self.agrees[key] = all(g.shape == w.shape and (g.float() - w.float()).abs().max().item() <= bound
                                   for g, w in zip(got, want))
        return self.agrees[key]
