"""Walk a model and swap nn.Linear layers for LowBitLinear, reporting every layer it leaves alone and why."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

from torch import nn

from .formats import FormatError, LowBitFormat, get_format
from .low_bit_linear import LowBitLinear

logger = logging.getLogger("ipex_llm_tf")

DEFAULT_MODULES_TO_NOT_CONVERT = ("lm_head",)


@dataclass
class ConversionReport:
    """What convert() did: the layers it quantized and, for the rest, the reason they stayed in full precision."""

    low_bit: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} Linear layers converted to {self.low_bit}, {len(self.skipped)} kept"]
        lines += [f"  kept {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def matches_module(name: str, patterns: "list[str] | tuple[str, ...]") -> bool:
    """True when `name` is a pattern, ends with ".pattern", or has the pattern as one of its dotted components."""
    parts = name.split(".")
    return any(name == p or name.endswith("." + p) or p in parts for p in patterns)


def resolve_modules_to_not_convert(modules_to_not_convert: "list[str] | None") -> list[str]:
    """None means the default (lm_head stays full precision); an explicit list is taken as given."""
    if modules_to_not_convert is None:
        return list(DEFAULT_MODULES_TO_NOT_CONVERT)
    if isinstance(modules_to_not_convert, str):
        raise TypeError("modules_to_not_convert must be a list of module names, e.g. ['lm_head'], not a string")
    return list(modules_to_not_convert)


def convert(model: nn.Module, low_bit: "str | LowBitFormat",
            modules_to_not_convert: "list[str] | None" = None) -> ConversionReport:
    """Replace every nn.Linear in `model` (in place) with a LowBitLinear holding `low_bit` weights.

    Layers named in modules_to_not_convert stay as they are. A layer whose in_features is not a multiple of the
    format's block size also stays in full precision, with a warning naming it: padding would change the layout
    that GGUF files and the kernels share, and such layers are rare and small (e.g. classifier heads).
    Works on meta-device skeletons too: the new layers then hold meta buffers to be filled by a loader.
    """
    fmt = get_format(low_bit)
    keep = resolve_modules_to_not_convert(modules_to_not_convert)
    report = ConversionReport(fmt.name)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if matches_module(name, keep):
                report.skipped[name] = "named in modules_to_not_convert"
                continue
            try:
                fmt.check_shape(child.out_features, child.in_features, where=name)
            except FormatError as err:
                report.skipped[name] = str(err)
                warnings.warn(f"keeping {name} in full precision: {err}", stacklevel=2)
                continue
            if child.weight.device.type == "meta":
                new = LowBitLinear(child.in_features, child.out_features, fmt, bias=child.bias is not None,
                                   device="meta", dtype=None if child.bias is None else child.bias.dtype, name=name)
            else:
                new = LowBitLinear.from_linear(child, fmt, name=name)
            setattr(parent, child_name, new)
            report.converted.append(name)
    logger.info("%s", report)
    return report
