"""Fill a model skeleton (parameters on the meta device) from a stream of checkpoint tensors.

Each Linear that convert() turned into a LowBitLinear is filled either with already-packed tensors (a low-bit
checkpoint) or by quantizing its full-precision weight the moment it arrives, so peak memory stays near the low-bit
model plus one tensor.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .low_bit_linear import LowBitEmbedding, LowBitLinear, PackedWeight
from .serialization import CheckpointError

logger = logging.getLogger("ipex_llm_tf")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device while active (buffers such as rotary tables stay real)."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: "nn.Parameter | None") -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def tie_embeddings(model: nn.Module) -> None:
    """Tie the output head to the input embedding as the config asks, packed modules included."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if isinstance(embedding, PackedWeight) or isinstance(head, PackedWeight):
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        if (tied and isinstance(embedding, LowBitEmbedding) and isinstance(head, LowBitLinear)
                and head.low_bit == embedding.low_bit):
            head.load_parts(embedding.parts)  # one set of buffers serves lookup and head
        return
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


class SkeletonFiller:
    """Routes (name, tensor) pairs into a skeleton model; `finish()` checks nothing is left on meta."""

    def __init__(self, model: nn.Module, dtype: "torch.dtype | None", source: str) -> None:
        self.model, self.dtype, self.source = model, dtype, source
        self.modules = dict(model.named_modules())
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.unexpected: list[str] = []

    def _resolve(self, name: str) -> tuple[str, str] | None:
        candidates = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1:])
        if self.prefix:
            candidates.append(f"{self.prefix}.{name}")
        for candidate in candidates:
            module_path, _, attr = candidate.rpartition(".")
            module = self.modules.get(module_path)
            if module is None:
                continue
            if isinstance(module, PackedWeight) and (attr == "weight" or attr in module._part_names or attr == "bias"):
                return module_path, attr
            if attr in module._parameters or attr in module._buffers:
                return module_path, attr
        return None

    def feed(self, name: str, tensor: torch.Tensor) -> None:
        """Place one checkpoint tensor into the model (quantizing it if its module is a LowBitLinear)."""
        target = self._resolve(name)
        if target is None:
            self.unexpected.append(name)
            return
        module_path, attr = target
        module = self.modules[module_path]
        if isinstance(module, PackedWeight):
            self._feed_low_bit(module_path, module, attr, tensor)
            return
        current = module._parameters.get(attr, module._buffers.get(attr))
        if current is not None and tuple(current.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{self.source}: tensor {name} has shape {tuple(tensor.shape)} but the model built "
                                  f"from config.json expects {tuple(current.shape)}; the config does not match the "
                                  f"weights.")
        if tensor.is_floating_point() and self.dtype is not None:
            tensor = tensor.to(self.dtype)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor

    def _feed_low_bit(self, module_path: str, module: PackedWeight, attr: str, tensor: torch.Tensor) -> None:
        where = f"{self.source}: {module_path}"
        if attr == "bias":
            if getattr(module, "bias", None) is None or tuple(tensor.shape) != (module.out_features,):
                raise CheckpointError(f"{where}.bias does not fit the layer built from config.json")
            bias_dtype = self.dtype if self.dtype is not None else tensor.dtype
            module.bias = nn.Parameter(tensor.to(bias_dtype), requires_grad=False)
            return
        if attr == "weight":
            if tuple(tensor.shape) != (module._rows, module._cols):
                raise CheckpointError(f"{where}.weight has shape {tuple(tensor.shape)} but config.json implies "
                                      f"{(module._rows, module._cols)}; the config does not match.")
            module.fmt.check_weight(tensor, where=module_path)
            module.load_parts(module.fmt.quantize_in_row_chunks(tensor))
            return
        parts = self.pending.setdefault(module_path, {})
        parts[attr] = tensor
        if len(parts) == len(module._part_names):
            try:
                module.load_parts(self.pending.pop(module_path))
            except ValueError as err:
                raise CheckpointError(f"{where}: {err}; the config does not match the tensors") from err

    def feed_all(self, tensors: Iterable[tuple[str, torch.Tensor]], total: int | None = None,
                 desc: str = "Loading") -> None:
        """Feed a stream of tensors with a progress bar."""
        for name, tensor in tqdm(tensors, total=total, desc=desc, unit="tensor", disable=None, leave=False):
            self.feed(name, tensor)

    def finish(self) -> None:
        """Tie weights, then raise CheckpointError if any parameter or packed tensor is still missing."""
        # The module table would keep every module the patch replaces next (q/k/v, gate/up) alive beside its merged
        # copy, for as long as the caller holds this filler: ~40 MB more at a SmolLM2 load's peak
        self.modules = {}
        if self.unexpected:
            logger.warning("%s: %d tensors not used by the model: %s", self.source, len(self.unexpected),
                           ", ".join(self.unexpected[:5]))
        if self.pending:
            raise CheckpointError(f"{self.source}: incomplete packed tensors for {sorted(self.pending)[:5]}; the "
                                  f"checkpoint is truncated or was saved with a different format")
        tie_embeddings(self.model)
        missing = [f"{path}.{name}" for path, module in self.model.named_modules()
                   for name, t in list(module._parameters.items()) + list(module._buffers.items())
                   if t is not None and t.device.type == "meta"]
        if missing:
            raise CheckpointError(f"{self.source}: no tensors for {len(missing)} model weights, e.g. "
                                  f"{', '.join(missing[:5])}; the config does not match the checkpoint.")
