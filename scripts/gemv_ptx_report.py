"""What the decode GEMV's K loop runs per code, per format and tile, from sm_90 PTX compiled on this machine.

    python scripts/gemv_ptx_report.py [--formats sym_int4 nf4 ...] [--tiles 16x64x2 ...] [--rows 1 2 4] [--json PATH]

No GPU is needed and nothing is timed: each (format, tile, activation rows) is compiled for an sm_90 target as
decode launches it (kernels.sm90_ptx), and the loop's instructions are counted, with the registers a thread uses
(which cap occupancy: 25% at 116 or more on an H100, where the tuned GEMVs ran latency-bound in session 20). A tile
is BLOCK_N x BLOCK_W x warps. Codes read in place (SUBNORMAL) are assumed, as on a device that keeps float32
subnormals (H100s do). Fewer instructions need not mean faster (docs/gpu-log.md, sessions 19, 24 and 30): use it to
see what a kernel change does to the loop, then time it on a GPU.

The host's Triton may lay a loop out otherwise than a device's (session 30: 3.9 gave main's sym_int5 16x64 tile 32
barriers and cross-warp group sums, the H100s' 3.6 gives it 20 and none). To compile with the device's version, put
that package first on the path, with no GPU and no other change:

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python scripts/gemv_ptx_report.py ...
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ipex_llm_tf.formats import get_format  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv as G  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv_planes as GP  # noqa: E402
from ipex_llm_tf.kernels.sm90_ptx import GEMV_POINTERS, compile_sm90, loop_summary, registers  # noqa: E402
from ipex_llm_tf.kernels.triton_operands import (PLANE_KINDS, block_kind, reads_activation_tile,  # noqa: E402
                                                 reads_codes_in_place, shuffles_codes)

FORMATS = ["sym_int4", "asym_int4", "sym_int5", "asym_int5", "sym_int8", "nf4", "fp4", "nf3", "fp6"]
TILES = ["16x64x2", "16x256x8", "8x128x4"]  # H100 decode choices at the 7B shapes (bench_gpu_linear)
COLUMNS = ["format", "tile", "rows", "loop_instructions", "per_code", "barriers", "shared", "global_loads", "gathers",
           "local", "layout_conversions", "registers"]


def parse_tile(text: str) -> tuple[int, int, int]:
    """BLOCK_N x BLOCK_W x warps from "16x64x2"."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise SystemExit(f"--tiles takes BLOCK_NxBLOCK_Wxwarps, like 16x64x2; got {text!r}")
    block_n, block_w, warps = (int(p) for p in parts)
    return block_n, block_w, warps


def report_row(name: str, tile: str, rows: int) -> dict | None:
    """One table row: the loop counts of `name`'s GEMV with this tile serving `rows` activation rows a program
    (None where the kernel has no such configuration: the two-plane GEMV serves one row)."""
    fmt = get_format(name)
    kind = block_kind(fmt)
    if kind is None:
        raise SystemExit(f"{name} has no block-format GEMV (fp8, fp16 and bf16 have their own kernels)")
    block_n, block_w, warps = parse_tile(tile)
    planes = kind in PLANE_KINDS
    if planes and rows != 1:
        return None
    subnormal = reads_codes_in_place(fmt, kind)
    # as CUDA launches it: table lookups by warp shuffles (kernels/lane_lookup), with their activations as one tile
    lanes = shuffles_codes(kind, subnormal)
    x_tile = reads_activation_tile(kind, subnormal, lanes)
    consts = dict(KIND=kind, SCALE_SHIFT=int(math.log2(fmt.block_size // 32)), BLOCK_N=block_n, BLOCK_W=block_w,
                  SPLIT_K=1, HAS_BIAS=False, EVEN=True, PREFETCH=0 if planes else 2, GATED=False,
                  SUBNORMAL=subnormal, LANES=lanes, X_TILE=x_tile)
    if planes:
        kernel, per_word = GP.gemv_planes_kernel, 16 if kind == G.CB3.value else 8
    else:
        kernel, per_word = G.gemv_words_kernel, 4 if kind == G.Q8_SYM.value else 8
        consts.update(BLOCK_M=rows, OVERLAP=False, TAIL=False)
    asm = compile_sm90(kernel, GEMV_POINTERS, consts, num_warps=warps)
    codes_per_thread = max(1, block_w * block_n * per_word // (32 * warps))
    return {"format": name, "tile": tile, "rows": rows, **loop_summary(asm, codes_per_thread),
            "registers": registers(asm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS)
    parser.add_argument("--tiles", nargs="+", default=TILES)
    parser.add_argument("--rows", nargs="+", type=int, default=[1], choices=[1, 2, 4])
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = [row for name in args.formats for tile in args.tiles for m in args.rows
            if (row := report_row(name, tile, m)) is not None]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in COLUMNS), "  ", row["top_opcodes"])
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": __import__("triton").__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
