"""GPU LowBitLinear matmul (kernels.triton_linear) per format: decode GEMV time and weight GB/s vs torch fp16 F.linear.

    python benchmarks/bench_gpu_linear.py [--formats sym_int4 ...] [--shapes 4096x4096 ...] [--json PATH]
                                          [--no-prefill] [--warm-jobs N]

Decode rows (M=1) time one call as a CUDA graph replaying it on several copies of the weight in turn, so the weight
comes from device memory (not L2) and launch gaps do not count; "eager" is the same sequence launched from Python.
GB/s counts the bytes of every stored tensor of the weight (codes, scales, mins) once per call; "% copy" compares it
with the device-to-device copy bandwidth measured here (a 1 GiB torch copy, bytes read + written). Prefill rows
time the fused dequantize-in-tile matmul, the dequantize + torch matmul fallback and fp16 F.linear at larger M.
--warm-jobs N first compiles (and tunes) every format in N parallel processes, filling Triton's on-disk cache, so
the timed run does not wait for compiles one by one.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import print_table, write_json  # noqa: E402

from ipex_llm_tf.formats import get_format, list_formats  # noqa: E402
from ipex_llm_tf.kernels import PackedCache  # noqa: E402
from ipex_llm_tf.kernels import triton_linear as TL  # noqa: E402
from ipex_llm_tf.kernels.triton_tuning import _replay_ms  # noqa: E402

SHAPES = ["4096x4096", "4096x11008", "11008x4096"]  # in_features x out_features
L2_FLUSH_BYTES = 256 << 20  # weight copies per timed sequence cover at least this many bytes


def parse_shape(text: str) -> tuple[int, int]:
    """(in_features, out_features) from "4096x11008"."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise SystemExit(f"--shapes takes INxOUT, like 4096x11008; got {text!r}")
    return int(parts[0]), int(parts[1])


def events_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median of `reps` event-timed calls of fn (each timing one call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, GB/s counting bytes read and written."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = events_ms(lambda: dst.copy_(src), reps=20)
    return 2 * n / ms / 1e6


def graph_ms(calls: list, replays: int = 20) -> tuple[float, float]:
    """(graph, eager) milliseconds per call of a list of zero-argument callables run in sequence. The graph time is
    the autotuner's decode timer (triton_tuning._replay_ms: one CUDA graph of the calls, best of 3 x 10 replays), so
    this table and the tiles autotuning picks are measured alike."""
    for c in calls:  # warm-up: compiles, autotuning, allocator
        c()
    torch.cuda.synchronize()

    def eager():
        for c in calls:
            c()
    e = events_ms(eager, reps=replays) / len(calls)
    try:
        g = _replay_ms(calls, torch.device("cuda", torch.cuda.current_device()))
    except RuntimeError as err:  # a path that cannot be captured: report eager time only
        print(f"graph capture failed ({str(err)[:100]}); eager timing", flush=True)
        return e, e
    return g, e


def nbytes(parts: dict) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def decode_rows(fmt_names: list[str], shapes: list[str], copy_gbs: float, m: int = 1) -> list[dict]:
    rows = []
    for shape in shapes:
        k, n = parse_shape(shape)
        w = torch.randn(n, k, device="cuda") * 0.02
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        base = None
        for name in ["torch_fp16"] + fmt_names:
            if name == "torch_fp16":
                parts = {"weight": w.half()}
            else:
                parts = get_format(name).quantize(w)
            size = nbytes(parts)
            copies = max(2, -(-L2_FLUSH_BYTES // size))
            sets = [parts] + [{key: t.clone() for key, t in parts.items()} for _ in range(copies - 1)]
            if name == "torch_fp16":
                calls = [lambda p=p: F.linear(x, p["weight"]) for p in sets]
            else:
                fmt = get_format(name)
                # a bf16 weight is timed with bf16 activations: with fp16 ones each call would first cast the weight
                xa = x.to(torch.bfloat16) if name == "bf16" else x
                caches = [PackedCache() for _ in sets]
                calls = [lambda p=p, c=c, xa=xa: TL.linear(xa, fmt, p, None, n, c) for p, c in zip(sets, caches)]
                ref = F.linear(xa.float(), fmt.dequantize(parts, torch.float32))
                err = float((calls[0]().float() - ref).abs().max() / ref.abs().max())
            g, e = graph_ms(calls)
            gbs = size / g / 1e6
            if name == "torch_fp16":
                base = g
            row = {"format": name, "shape": shape, "M": m, "us": round(g * 1e3, 2), "eager_us": round(e * 1e3, 2),
                   "MB": round(size / 1e6, 2), "GB/s": round(gbs, 1), "%copy": round(100 * gbs / copy_gbs, 1),
                   "vs_fp16": round(base / g, 2)}
            if name != "torch_fp16":
                row["rel_err"] = f"{err:.1e}"
            if name not in ("torch_fp16", "fp16", "bf16"):  # the 16-bit formats run torch's F.linear, not a tile
                tuned = [str(v) for key, v in TL.tuned_configs().items() if key[3:5] == (n, k) and key[0] == "gemv"]
                row["config"] = tuned[-1] if tuned else ""
            rows.append(row)
            print(row, flush=True)
            del sets, calls
        torch.cuda.empty_cache()
    return rows


def prefill_rows(fmt_names: list[str], shape: str, ms: list[int]) -> list[dict]:
    k, n = parse_shape(shape)
    w = torch.randn(n, k, device="cuda") * 0.02
    w16 = w.half()
    rows = []
    for name in fmt_names:
        fmt = get_format(name)
        parts = fmt.quantize(w)
        fp8 = name.startswith("fp8")
        ops = TL.fp8_operands(fmt, parts) if fp8 else TL.block_operands(fmt, parts)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            flops = 2 * m * n * k
            fused_cands = TL.matmul_candidates(m, n, k, x.device, pipelined=fp8 or ops.kind not in TL.PLANE_KINDS)
            launch = TL.matmul_fp8 if fp8 else TL.matmul_blocks
            run = (lambda c: launch(x, ops, None, n, c))
            cfg = TL._pick(("bench-mm", "fp8" if fp8 else ops.kind, TL._row_bucket(m), n, k, x.dtype), fused_cands, run,
                           x.device)
            t_fused = events_ms(lambda: run(cfg), reps=20)
            if fp8:
                t_deq = events_ms(lambda: TL.dequant_matmul_fp8(x, ops, None, n), reps=20)
            else:
                t_deq = events_ms(lambda: TL.dequant_matmul_blocks(x, ops, None, n), reps=20)
            t_16 = events_ms(lambda: F.linear(x, w16), reps=20)
            t_ours = events_ms(lambda: TL.linear(x, fmt, parts, None, n, None), reps=20)
            row = {"format": name, "shape": shape, "M": m, "fused_us": round(t_fused * 1e3, 1),
                   "dequant+mm_us": round(t_deq * 1e3, 1), "fp16_us": round(t_16 * 1e3, 1),
                   "dispatch_us": round(t_ours * 1e3, 1), "fused_TFLOP/s": round(flops / t_fused / 1e9, 1),
                   "fp16_TFLOP/s": round(flops / t_16 / 1e9, 1), "config": str(cfg)}
            rows.append(row)
            print(row, flush=True)
    return rows


def small_batch_rows(name: str, shape: str, ms: list[int]) -> list[dict]:
    """GEMV (the single- and multi-row tiles decode tries) vs fused tl.dot matmul for a few rows: where
    GEMV_MAX_ROWS should sit."""
    k, n = parse_shape(shape)
    fmt = get_format(name)
    parts = fmt.quantize(torch.randn(n, k, device="cuda") * 0.02)
    ops = TL.block_operands(fmt, parts)
    size = nbytes(parts)
    copies = max(2, -(-L2_FLUSH_BYTES // size))
    sets = [TL.block_operands(fmt, {key: t.clone() for key, t in parts.items()}) for _ in range(copies - 1)] + [ops]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        # the tiles decode tries at this many rows: one row a program, and 2 or 4 (multi-row tiles, up to 8 rows)
        g_cands = TL._block_gemv_candidates(m, n, ops, x.device)
        if m > 2 and ops.kind not in TL.PLANE_KINDS:
            g_cands += TL.gemv_multirow_candidates(m, ops.words_per_row)
        g_cfg = TL._pick(("bench-gemv", ops.kind, m, n, k, x.dtype), g_cands,
                         lambda c: TL.gemv_blocks(x, ops, None, n, c), x.device)
        m_cfg = TL._pick(("bench-mm", ops.kind, TL._row_bucket(m), n, k, x.dtype),
                         TL.matmul_candidates(m, n, k, x.device, pipelined=ops.kind not in TL.PLANE_KINDS),
                         lambda c: TL.matmul_blocks(x, ops, None, n, c), x.device)
        t_g, _ = graph_ms([lambda o=o: TL.gemv_blocks(x, o, None, n, g_cfg) for o in sets])
        t_m, _ = graph_ms([lambda o=o: TL.matmul_blocks(x, o, None, n, m_cfg) for o in sets])
        t_d, _ = graph_ms([lambda o=o: TL.dequant_matmul_blocks(x, o, None, n) for o in sets])
        row = {"format": name, "shape": shape, "M": m, "gemv_us": round(t_g * 1e3, 2), "mm_us": round(t_m * 1e3, 2),
               "dequant+mm_us": round(t_d * 1e3, 2),
               "gemv_GB/s": round(size / t_g / 1e6, 1), "mm_GB/s": round(size / t_m / 1e6, 1),
               "gemv_config": str(g_cfg), "mm_config": str(m_cfg)}
        rows.append(row)
        print(row, flush=True)
    return rows


def warm(fmt_names: list[str], jobs: int, args: argparse.Namespace) -> None:
    """Compile every kernel the run needs in `jobs` parallel processes (fills Triton's on-disk cache)."""
    groups = [fmt_names[i::jobs] for i in range(jobs) if fmt_names[i::jobs]]
    procs = []
    for g in groups:
        cmd = [sys.executable, __file__, "--formats", *g, "--shapes", *args.shapes, "--warm-only"]
        if args.no_prefill:
            cmd.append("--no-prefill")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            print(f"warm-up process failed ({p.returncode}):\n{err[-3000:]}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=[f for f in list_formats()])
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--prefill-formats", nargs="+", default=["sym_int4", "sym_int8", "fp8_e4m3"])
    parser.add_argument("--prefill-rows", nargs="+", type=int, default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--small-batch-formats", nargs="*", default=["sym_int4"],
                        help="formats timed at 1-16 rows: GEMV, fused matmul and dequantize + matmul")
    parser.add_argument("--warm-jobs", type=int, default=0)
    parser.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/bench_gpu_linear.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_linear needs a CUDA device")
    t0 = time.time()
    if args.warm_jobs and not args.warm_only:
        warm(args.formats, args.warm_jobs, args)
        print(f"warm-up compile: {time.time() - t0:.0f} s", flush=True)
    if args.warm_only:
        decode_rows(args.formats, args.shapes[:1] + args.shapes[2:], 1.0)  # K=4096 and K=11008 specializations
        if not args.no_prefill:
            prefill_rows([f for f in args.formats if f in args.prefill_formats], args.shapes[-1], [16, 256])
        return

    copy_gbs = copy_bandwidth()
    torch.cuda.empty_cache()  # the 2 GiB of copy buffers
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
    decode = decode_rows(args.formats, args.shapes, copy_gbs)
    small = [row for name in args.small_batch_formats
             for row in small_batch_rows(name, args.shapes[1 if len(args.shapes) > 1 else 0], [1, 2, 4, 8, 16])]
    prefill = [] if args.no_prefill else prefill_rows([f for f in args.formats if f in args.prefill_formats],
                                                      args.shapes[1 if len(args.shapes) > 1 else 0],
                                                      args.prefill_rows)
    print()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {copy_gbs:.0f} GB/s  "
          f"(decode M=1, CUDA graph over weight copies; GB/s of stored weight bytes)")
    print_table(decode, ["format", "shape", "us", "eager_us", "MB", "GB/s", "%copy", "vs_fp16", "rel_err", "config"])
    print()
    print_table(small, ["format", "shape", "M", "gemv_us", "mm_us", "dequant+mm_us", "gemv_GB/s", "mm_GB/s",
                        "gemv_config", "mm_config"])
    if prefill:
        print()
        print_table(prefill, ["format", "shape", "M", "fused_us", "dequant+mm_us", "fp16_us", "dispatch_us",
                              "fused_TFLOP/s", "fp16_TFLOP/s", "config"])
    payload = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_gbs, "decode": decode,
               "small_batch": small, "prefill": prefill, "triton": __import__("triton").__version__,
               "autotune": os.environ.get("IPEX_LLM_TF_TRITON_AUTOTUNE", "1"),
               "tuned": {str(k): str(v) for k, v in TL.tuned_configs().items()}, "seconds": round(time.time() - t0)}
    out = write_json("bench_gpu_linear", payload, args.json)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
