"""Walk a model and swap nn.Linear layers for LowBitLinear, reporting every layer it leaves alone and why."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

from torch import nn

from .formats import FormatError, LowBitFormat, get_format
from .low_bit_linear import LowBitEmbedding, LowBitLinear

logger = logging.getLogger("ipex_llm_tf")

DEFAULT_MODULES_TO_NOT_CONVERT = ("lm_head",)
# mixed_precision=True (IPEX-LLM's option of that name): the output head in 8 bits, as llama.cpp keeps it in 4-bit files
MIXED_PRECISION_HEAD = "sym_int8"


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


def check_mixed_precision(low_bit: "str | LowBitFormat", modules_to_not_convert: "list[str] | None") -> None:
    """ValueError where mixed_precision=True contradicts the other arguments."""
    fmt = get_format(low_bit)
    if fmt.name in ("fp16", "bf16"):
        raise ValueError(f"mixed_precision=True puts the output head in {MIXED_PRECISION_HEAD}, below the "
                         f"{fmt.name} of the rest of the model; drop mixed_precision or pick a lower-bit format")
    if modules_to_not_convert is not None and matches_module("lm_head", list(modules_to_not_convert)):
        raise ValueError("mixed_precision=True quantizes lm_head to sym_int8, but modules_to_not_convert keeps it in "
                         "full precision; use one or the other")


def quantize_head(model: nn.Module, low_bit: str = MIXED_PRECISION_HEAD) -> bool:
    """Put the output head (and the input embedding tied to it, sharing one packed table) in `low_bit`, in place.

    Works on loaded models and on meta skeletons (a loader then fills the new modules). False, with a log line, when
    there is no full-precision head or its shape does not fit the format.
    """
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head = get_out() if callable(get_out) else None
    if type(head) is not nn.Linear:
        logger.info("mixed_precision: no full-precision nn.Linear output head to quantize (%s)", type(head).__name__)
        return False
    fmt = get_format(low_bit)
    try:
        fmt.check_shape(head.out_features, head.in_features, where="lm_head")
    except FormatError as err:
        warnings.warn(f"mixed_precision: keeping the output head in full precision: {err}", stacklevel=2)
        return False
    embedding = get_in() if callable(get_in) else None
    tied = (getattr(getattr(model, "config", None), "tie_word_embeddings", False) and type(embedding) is nn.Embedding
            and tuple(embedding.weight.shape) == tuple(head.weight.shape))
    on_meta = head.weight.device.type == "meta"
    if tied or on_meta:  # filled below from the embedding's table, or later by a loader
        new_head = LowBitLinear(head.in_features, head.out_features, fmt, bias=head.bias is not None, device="meta",
                                dtype=None if head.bias is None else head.bias.dtype, name="lm_head")
    else:
        new_head = LowBitLinear.from_linear(head, fmt, name="lm_head")
    if tied:
        packed = LowBitEmbedding(embedding.num_embeddings, embedding.embedding_dim, fmt,
                                 padding_idx=embedding.padding_idx, device="meta", name="embed_tokens")
        packed.output_dtype = embedding.weight.dtype
        if not on_meta:
            packed.load_parts(fmt.quantize_in_row_chunks(embedding.weight.detach()))
            new_head.load_parts(packed.parts, bias=head.bias)  # one set of buffers serves lookup and head
        model.set_input_embeddings(packed)
    model.set_output_embeddings(new_head)
    return True
