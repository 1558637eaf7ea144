"""Where a tensor-parallel decode step goes: median step time of a saved 7B-shaped checkpoint, TP vs one process.

    python benchmarks/profile_tp.py build DIR                       # random Llama-2-7B shape, sym_int4, save_low_bit
    python benchmarks/profile_tp.py single DIR [--profile]          # one process, eager steps (no CUDA graphs)
    torchrun --nproc-per-node N benchmarks/profile_tp.py tp DIR [--profile]

Steps are single-token forwards through a DynamicCache after a 32-token prompt, each timed between device
synchronizations (no barriers, unlike bench_tp.py); --profile prints torch.profiler tables (CUDA and host time) of three
steps on rank 0. This is how cuDNN's per-key-length planning in one-query SDPA was found (see README, Multi-device).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _step(model: torch.nn.Module, token: torch.Tensor, cache: object) -> torch.Tensor:
    from ipex_llm_tf.models.graph_decode import CACHE_KWARG
    return model(input_ids=token, use_cache=True, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)


def measure(model: torch.nn.Module, label: str, steps: int, profile: bool) -> None:
    """Print the median step time (and with profile, the profiler tables on rank 0)."""
    from transformers.cache_utils import DynamicCache
    from ipex_llm_tf.models.graph_decode import CACHE_KWARG
    device = next(model.parameters()).device
    sync = getattr(torch, device.type).synchronize if device.type != "cpu" else (lambda: None)
    ids = torch.randint(100, 30000, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **{CACHE_KWARG: DynamicCache()})
        cache, token = getattr(out, CACHE_KWARG), out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            token = _step(model, token, cache)
        sync()
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            token = _step(model, token, cache)
            sync()
            samples.append((time.perf_counter() - start) * 1e3)
        samples.sort()
        print(f"[{label}] rank {os.environ.get('RANK', '-')}: median step {samples[len(samples) // 2]:.2f} ms",
              flush=True)
        if profile and os.environ.get("RANK", "0") == "0":
            from torch.profiler import profile as run_profiler
            with run_profiler() as prof:
                for _ in range(3):
                    token = _step(model, token, cache)
                sync()
            table = prof.key_averages()
            for key in ("cuda_time_total" if device.type == "cuda" else "cpu_time_total", "self_cpu_time_total"):
                print(table.table(sort_by=key, row_limit=14, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["build", "single", "tp"])
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mode == "build":
        from bench_tp import build_checkpoint
        build_checkpoint(Path(args.checkpoint), "7b", "sym_int4", device)
    elif args.mode == "single":
        os.environ["IPEX_LLM_TF_GRAPH_DECODE"] = "0"  # the eager step, as tensor-parallel ranks run it
        import ipex_llm_tf
        measure(ipex_llm_tf.AutoModelForCausalLM.load_low_bit(args.checkpoint).to(device), "single", args.steps,
                args.profile)
    else:
        import torch.distributed as dist
        from ipex_llm_tf.distributed import load_low_bit_tp
        model = load_low_bit_tp(args.checkpoint, device=device)
        measure(model, f"tp world {os.environ['WORLD_SIZE']}", args.steps, args.profile)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
