"""The format table users see in the docs and the CLI, generated from the registry so it can never drift."""
from __future__ import annotations

import torch

from . import get_format, list_formats

_DTYPE_NAMES = {torch.uint8: "uint8", torch.int8: "int8", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float32: "fp32", torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


def _layout(name: str) -> str:
    specs = get_format(name).part_specs(64, 256)  # every format is row-wise: dim 0 is N, dim 1 a fraction of K
    cells = []
    for part, (shape, dtype) in specs.items():
        cols = shape[1]
        inner = "K" if cols == 256 else ("1" if cols == 1 else f"K/{256 // cols}")
        cells.append(f"`{part}` {_DTYPE_NAMES.get(dtype, str(dtype))} [N, {inner}]")
    return "; ".join(cells)


def format_table() -> str:
    """A markdown table of every registered format: bits per weight, block, stored tensors, GGUF twin."""
    from gguf import GGMLQuantizationType

    rows = ["| name | bits/weight | block | stored tensors (weight is [N out, K in]) | GGUF twin | definition |",
            "|---|---|---|---|---|---|"]
    for name in list_formats():
        fmt = get_format(name)
        twin = GGMLQuantizationType(fmt.gguf_type).name if fmt.gguf_type is not None else "-"
        rows.append(f"| {name} | {fmt.bits_per_weight:g} | {fmt.block_size} | {_layout(name)} | {twin} | "
                    f"{fmt.description} |")
    return "\n".join(rows)
