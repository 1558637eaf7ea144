"""Each format's tuned decode GEMV on the Llama-2-7B shapes, one launch each inside an NVTX range, for Nsight Compute.

    ncu --clock-control none --nvtx --nvtx-include prof/ --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section SchedulerStats \\
        python benchmarks/profile_gemv.py [--formats sym_int4 nf4 sym_int5] [--shapes 4096x4096 ...]

Every shape is first run a few times outside the range, so autotuning (kernels.triton_tuning) settles its launch as
decode does; then the settled launch runs once inside the range "prof", the only kernel ncu is asked to profile. The
tuned configuration of each is printed, in the order ncu lists the kernels. Run it once without ncu first: the
tuning cache then hands the ncu run the choices made at full speed (tuned under ncu, every candidate runs slowed by
it, and the pick can differ: (32, 64, 4) instead of (16, 128, 4) for sym_int4 4096x4096 on an H100). This is how
docs/gpu-log.md (session 20) found the GEMVs latency-bound at 12-24% occupancy. Needs a CUDA device.
"""
from __future__ import annotations

import argparse

import torch

from bench_gpu_linear import parse_shape
from ipex_llm_tf.formats import get_format
from ipex_llm_tf.kernels import PackedCache
from ipex_llm_tf.kernels import triton_linear as TL

SHAPES = ["4096x4096", "4096x11008", "11008x4096"]


def profile(name: str, shape: str) -> str:
    """Tune `name`'s GEMV for `shape` (in x out), run it once inside the NVTX range "prof"; its settled config."""
    k, n = parse_shape(shape)
    fmt = get_format(name)
    parts = fmt.quantize(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    cache = PackedCache()
    for _ in range(3):
        TL.linear(x, fmt, parts, None, n, cache)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    TL.linear(x, fmt, parts, None, n, cache)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    tuned = [str(c) for key, c in TL.tuned_configs().items() if key[0] == "gemv" and key[3:5] == (n, k)]
    return tuned[-1] if tuned else "(no GEMV: another kernel served it)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["sym_int4", "nf4", "sym_int5"])
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_gemv.py needs a CUDA device")
    for name in args.formats:
        for shape in args.shapes:
            print(name, shape, profile(name, shape), flush=True)


if __name__ == "__main__":
    main()
