"""Device handling: which accelerators exist, a clear error for absent ones, the CPU-resident embedding, and the
garbage-collection pause every graph capture runs under."""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class DeviceError(RuntimeError):
    """The requested device does not exist on this machine."""


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's automatic garbage collection off for the block (a graph capture), back as it was after."""
    # A collection mid-capture that frees an unreachable earlier graph (a dropped model's) destroys it, which a
    # capture forbids: CUDA invalidates the capture ("operation failed due to a previous error during capture").
    # torch's graph context no longer collects before capturing (force_cudagraph_gc is off by default).
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def free_random_generator(api: Any, device: torch.device) -> None:
    """Give `device`'s default random generator (`api`: torch.cuda or torch.xpu) a fresh state with its seed and
    offset: after a failed graph capture."""
    # A capture registers that state for capture and only a capture that ends cleanly releases it; after a failed
    # one every random draw outside a capture raises ("Offset increment outside graph capture"). Graphs captured
    # earlier keep the old state: ours draw no random numbers.
    generators = getattr(api, "default_generators", ())
    index = device.index if device.index is not None else api.current_device()
    if index >= len(generators):
        return
    stuck = generators[index]
    fresh = type(stuck)(device=stuck.device)
    fresh.manual_seed(stuck.initial_seed())
    fresh.set_offset(stuck.get_offset())
    stuck.graphsafe_set_state(fresh)


def available_devices() -> list[str]:
    """Device types usable here, best first: xpu, cuda, cpu."""
    found = []
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        found.append("xpu")
    if torch.cuda.is_available():
        found.append("cuda")
    return found + ["cpu"]


def best_device() -> str:
    """The device "auto" means: xpu, then cuda, then cpu."""
    return available_devices()[0]


def check_device(device: "str | torch.device") -> torch.device:
    """Parse a device and raise DeviceError (what is missing, what exists) if it is not present."""
    dev = torch.device(best_device() if str(device) == "auto" else device)
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type not in ("cuda", "xpu"):
        raise DeviceError(f"device {str(device)!r} is not supported; use one of {available_devices()} or 'auto'")
    backend = getattr(torch, dev.type)
    if not backend.is_available():
        raise DeviceError(f"device {str(device)!r} is not available on this machine (found: "
                          f"{', '.join(available_devices())}); install a PyTorch build with {dev.type} support or "
                          f"use device='cpu'")
    if dev.index is not None and dev.index >= backend.device_count():
        raise DeviceError(f"device {str(device)!r} does not exist: this machine has {backend.device_count()} "
                          f"{dev.type} device(s)")
    return dev


def _device_in_args(args: tuple, kwargs: dict) -> "torch.device | None":
    candidates = [kwargs.get("device")] + [a for a in args if isinstance(a, (str, torch.device))]
    for candidate in candidates:
        if candidate is not None:
            return check_device(candidate)
    return None


def move_model(model: nn.Module, *args, **kwargs) -> nn.Module:
    """model.to(...) that first checks the target device exists (bound onto low-bit model instances)."""
    device = _device_in_args(args, kwargs)
    if device is not None:
        args = tuple(device if isinstance(a, (str, torch.device)) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = device
    return type(model).to(model, *args, **kwargs)


class CPUEmbedding(nn.Embedding):
    """An embedding whose weight and lookup stay on the CPU; outputs go to the device the model was moved to."""

    output_device: torch.device = torch.device("cpu")

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "CPUEmbedding":
        """Wrap an existing embedding, giving it its own CPU copy of the weight (tied heads keep theirs)."""
        new = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                  device="meta")
        # a buffer, not a parameter: transformers takes model.device from the first parameter, and generate() builds
        # its positions there, so a CPU table listed first would put them on the CPU beside a CUDA model
        del new.weight
        new.register_buffer("weight", embedding.weight.detach().to("cpu").clone())
        new.output_device = embedding.weight.device  # a model already on its accelerator keeps its outputs there
        return new

    def _apply(self, fn, recurse: bool = True):
        # keep the weight where it is; only remember where outputs should go, and follow dtype casts
        probe = fn(torch.empty(0, device=self.weight.device, dtype=self.weight.dtype))
        self.output_device = probe.device
        if probe.dtype != self.weight.dtype and probe.is_floating_point():
            self.weight = self.weight.to(probe.dtype)
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Look up on the CPU, return on the model's device."""
        out = F.embedding(input_ids.to("cpu"), self.weight, self.padding_idx)
        return out.to(self.output_device)
