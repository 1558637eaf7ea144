"""Arrival counters: zeroed int32 buffers, one per device and user, that a kernel's programs count themselves into.

The program that arrives last in its group does the group's final work (decode attention's combine of key splits,
the split-K matmul's sum of partials) and sets the counter back to zero, so a buffer is zero between calls and needs
no memset. Calls on one device run one after another (one stream, graph replays included), so each user shares one
buffer across its calls. A buffer outgrown stays alive, as graphs captured over it keep its address.
"""
from __future__ import annotations

import torch

from .triton_tuning import capturing


class ArrivalCounters:
    """Per-device zeroed counters for one kind of kernel, grown as calls need more."""

    def __init__(self, minimum: int = 1024) -> None:
        self.minimum = minimum
        self.buffers: dict[torch.device, torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []

    def get(self, device: torch.device, count: int) -> torch.Tensor | None:
        """`count` zeroed counters on `device`; None inside a graph capture when none large enough exist yet (a
        buffer made there would be zeroed only when the graph first replays)."""
        counters = self.buffers.get(device)
        if counters is not None and counters.numel() >= count:
            return counters
        if capturing(device):
            return None
        if counters is not None:
            self.retired.append(counters)
        counters = self.buffers[device] = torch.zeros(max(count, self.minimum), dtype=torch.int32, device=device)
        return counters
