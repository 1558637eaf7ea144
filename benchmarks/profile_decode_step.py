"""Where a graph-replayed decode step goes: per-kernel device time of one token, Llama-2-7B shape, random weights.

    python benchmarks/profile_decode_step.py [--formats sym_int4 nf4] [--steps 16] [--tiny]

Each format: next-token ms from timed generate() calls, then torch.profiler over `steps` replayed tokens (CUPTI
reports the kernels inside CUDA graph replays): per kernel name its device time per token, calls per token and time
per call, and the median gap between consecutive kernels. The profiled call includes its prompt's prefill, so
prefill-only kernels show up with fractional calls per token. This is how the attention, KV-write and residual-add
kernels of the graph step were chosen (README, "What a GPU decode step runs").
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import build  # noqa: E402

import ipex_llm_tf  # noqa: E402
from ipex_llm_tf.bench import time_generate  # noqa: E402


def kernel_table(model: torch.nn.Module, ids: torch.Tensor, steps: int, rows: int = 30) -> list[str]:
    """Lines of the per-kernel table for `steps` decoded tokens (and the prompt's prefill)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        time_generate(model, ids, steps + 1)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for event in kernels:
        per_name[event.name][0] += 1
        per_name[event.name][1] += event.device_time_total
    total = sum(us for _, us in per_name.values())
    lines = [f"{len(kernels) / steps:.0f} kernels and {total / steps / 1e3:.3f} ms of device time per token"]
    for name, (calls, us) in sorted(per_name.items(), key=lambda item: -item[1][1])[:rows]:
        lines.append(f"{us / steps:9.1f} us/token {calls / steps:7.1f} calls/token {us / calls:8.2f} us/call  "
                     f"{name[:90]}")
    ordered = sorted(kernels, key=lambda e: e.time_range.start)
    gaps = sorted(b.time_range.start - a.time_range.end for a, b in zip(ordered, ordered[1:]))
    if gaps:
        overlapping = sum(gap < 0 for gap in gaps)  # a kernel launched early (programmatic dependent launch)
        lines.append(f"median gap between kernels {gaps[len(gaps) // 2]:.2f} us; {overlapping} of {len(gaps)} "
                     f"kernels start before the previous one ends")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["sym_int4"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a smoke test")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode_step.py profiles CUDA graph replays: it needs a CUDA device")
    for fmt in args.formats:
        model = ipex_llm_tf.optimize_model(build("cuda", args.tiny), low_bit=fmt)
        ids = torch.randint(100, 30000, (1, 32), device="cuda")
        time_generate(model, ids, 40)  # tuning and graph capture
        first = min(time_generate(model, ids, 1) for _ in range(3))
        full = min(time_generate(model, ids, 65) for _ in range(2))
        print(f"== {fmt}: next-token {(full - first) / 64 * 1e3:.3f} ms", flush=True)
        print("\n".join(kernel_table(model, ids, args.steps)), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
