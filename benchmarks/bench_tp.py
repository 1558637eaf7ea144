"""Tensor-parallel decode: next-token latency of one low-bit model on 1, 2, 4 ranks (torchrun, one process per rank).

    python benchmarks/bench_tp.py [--ranks 1 2 4] [--shape auto|7b|small] [--format sym_int4] [--steps 32]

With as many GPUs as the largest rank count, the model is Llama-2-7B-shaped (random weights) and each rank runs on
its own GPU over NCCL (XCCL on XPU). Otherwise it runs on the CPU over gloo with a small Llama (the 7B shape does not
fit a CI machine), the cores split evenly between ranks: those figures show the communication overhead of the
plan, not a speed-up, and the table says which was measured. Batch 1, 32-token prompt, next-token ms = median of
`steps` single-token forwards through the KV cache, every rank timed between barriers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, print_table, write_json

SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},
    # 4 heads of 128 and 4 KV heads: splits over 1, 2 and 4 ranks with whole 32-blocks on every rank
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4},
}


def accelerator() -> tuple[str, int]:
    """('cuda' | 'xpu' | 'cpu', number of devices)."""
    for name in ("xpu", "cuda"):
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_available():
            return name, backend.device_count()
    return "cpu", 0


def build_checkpoint(directory: Path, shape: str, low_bit: str, device: str) -> None:
    """A random Llama of the given shape, quantized on `device`, saved with save_low_bit."""
    import ipex_llm_tf
    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.float16 if device != "cpu" else torch.bfloat16)
    ipex_llm_tf.optimize_model(model.eval(), low_bit=low_bit).save_low_bit(directory)


def worker(checkpoint: str, device: str, steps: int, out: str) -> None:
    """One torchrun rank: load its shard, prefill, time single-token decode steps; rank 0 writes the JSON."""
    import torch.distributed as dist
    from transformers.cache_utils import DynamicCache

    from ipex_llm_tf.distributed import load_low_bit_tp
    from ipex_llm_tf.models.graph_decode import CACHE_KWARG  # "cache" or "past_key_values", by transformers version
    world = int(os.environ["WORLD_SIZE"])
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = load_low_bit_tp(checkpoint, device=device)
    target = next(model.parameters()).device
    sync = getattr(torch, target.type).synchronize if target.type != "cpu" else (lambda: None)
    ids = torch.randint(100, 30000, (1, 32), generator=torch.Generator().manual_seed(0)).to(target)
    samples = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernels, packed layouts, communicators
            cache = DynamicCache()
            out_ = model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache})
            model(input_ids=out_.logits[:, -1:].argmax(-1), use_cache=True, **{CACHE_KWARG: getattr(out_, CACHE_KWARG)})
        if target.type != "cpu":
            getattr(torch, target.type).reset_peak_memory_stats(target)
        out_ = model(input_ids=ids, use_cache=True, **{CACHE_KWARG: DynamicCache()})
        cache, token = getattr(out_, CACHE_KWARG), out_.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            sync()
            dist.barrier()
            start = time.perf_counter()
            out_ = model(input_ids=token, use_cache=True, **{CACHE_KWARG: cache})
            token = out_.logits[:, -1:].argmax(-1)  # the greedy pick needs the logits: a full step
            sync()
            samples.append((time.perf_counter() - start) * 1e3)
            cache = getattr(out_, CACHE_KWARG)
    peak = (getattr(torch, target.type).max_memory_allocated(target) / 2**20 if target.type != "cpu"
            else peak_rss_mib())
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if dist.get_rank() == 0:
        samples.sort()
        Path(out).write_text(json.dumps({"next_token_ms": samples[len(samples) // 2], "peak_mib": peaks}))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(checkpoint: Path, ranks: int, device: str, steps: int) -> dict:
    """Launch `ranks` workers with torchrun; their rank 0's measurement."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   __file__, "--worker", str(checkpoint), "--device", device, "--steps", str(steps), "--out",
                   str(out)]
        subprocess.run(command, check=True, timeout=1800)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shape", choices=["auto", *SHAPES], default="auto")
    parser.add_argument("--format", default="sym_int4")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.device, args.steps, args.out)
        return
    kind, count = accelerator()
    on_gpus = kind != "cpu" and count >= max(args.ranks)
    device = kind if on_gpus else "cpu"
    shape = args.shape if args.shape != "auto" else ("7b" if on_gpus else "small")
    note = (f"{count} x {kind} over {'NCCL' if kind == 'cuda' else 'XCCL'}" if on_gpus else
            f"CPU over gloo, {os.cpu_count()} cores split between ranks (no {max(args.ranks)} accelerators here)")
    print(f"bench_tp: Llama {shape} shape, random weights, {args.format}, {note}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model"
        build_checkpoint(checkpoint, shape, args.format, device)
        for ranks in args.ranks:
            result = run_ranks(checkpoint, ranks, device, args.steps)
            rows.append({"ranks": ranks, "device": device, "shape": shape, "format": args.format,
                         "next_token_ms": round(result["next_token_ms"], 2),
                         "tok_s": round(1e3 / result["next_token_ms"], 1),
                         "peak_mib_per_rank": "/".join(f"{p:.0f}" for p in result["peak_mib"])})
    base = rows[0]["next_token_ms"]
    for row in rows:
        row["vs_first_row"] = f"{base / row['next_token_ms']:.2f}x"
    print_table(rows, ["ranks", "device", "shape", "format", "next_token_ms", "tok_s", "vs_first_row",
                       "peak_mib_per_rank"])
    print(f"wrote {write_json('bench_tp', {'note': note, 'rows': rows}, args.json)}")


if __name__ == "__main__":
    main()
