"""CPU LowBitLinear per format vs fp32 / bf16 nn.Linear: ms per call, weight GB/s, bytes per weight.

    python benchmarks/bench_linear.py [--threads 2] [--batches 1 16] [--json PATH]

Rows "ours" are what LowBitLinear's dispatch runs; rows "dequant+bf16 GEMM" time the alternative path for the
formats that have the packed int4 kernel, which is how kernels.CPU_GEMM_MIN_ROWS was chosen.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_ms, write_json  # noqa: E402

from ipex_llm_tf import LowBitLinear, list_formats  # noqa: E402
from ipex_llm_tf.kernels import cpu_int4  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008)]  # (in_features, out_features)


def weight_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in layer.buffers()) + sum(
        p.numel() * p.element_size() for p in layer.parameters())


def row(name: str, path: str, shape: tuple[int, int], batch: int, ms: float, nbytes: int) -> dict[str, object]:
    k, n = shape
    return {"format": name, "path": path, "shape": f"{k}x{n}", "batch": batch, "ms": round(ms, 3),
            "GB/s": round(nbytes / ms / 1e6, 2), "bytes/weight": round(nbytes / (k * n), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--formats", nargs="+", default=list_formats())
    parser.add_argument("--json", default=None, help="output file (default benchmarks/results/bench_linear.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for k, n in SHAPES:
            dense = nn.Linear(k, n, bias=False)
            dense_bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
            for batch in args.batches:
                x = torch.randn(batch, k)
                rows.append(row("fp32 nn.Linear", "torch", (k, n), batch, time_ms(lambda: dense(x)),
                                weight_bytes(dense)))
                xb = x.bfloat16()
                rows.append(row("bf16 nn.Linear", "torch", (k, n), batch, time_ms(lambda: dense_bf16(xb)),
                                weight_bytes(dense_bf16)))
            for fmt in args.formats:
                layer = LowBitLinear.from_linear(dense, fmt)
                nbytes = weight_bytes(layer)
                for batch in args.batches:
                    x = torch.randn(batch, k)
                    rows.append(row(fmt, "ours", (k, n), batch, time_ms(lambda: layer(x), repeats=5), nbytes))
                    if cpu_int4.supports(layer.fmt, n):
                        xb = x.bfloat16()
                        gemm = time_ms(lambda: F.linear(xb, layer.dequantized_weight(torch.bfloat16)), repeats=3)
                        rows.append(row(fmt, "dequant+bf16 GEMM", (k, n), batch, gemm, nbytes))
                print(f"  measured {fmt} {k}x{n}", file=sys.stderr)
    columns = ["format", "path", "shape", "batch", "ms", "GB/s", "bytes/weight"]
    print_table(rows, columns)
    out = write_json("bench_linear", {"threads": args.threads, "rows": rows}, args.json)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
