"""Fused-model ops on the CPU, ours (torch reference) vs intel-extension-for-pytorch's, and decode tok/s per backend.

    python benchmarks/bench_ipex_ops.py [--threads 2] [--new-tokens 64] [--rounds 2] [--no-decode] [--json PATH]

Run it where ipex is installed (bash scripts/test-ipex.sh builds that venv; IPEX_BENCH=1 runs this too). Ops: RMSNorm,
RoPE (one q or k tensor, as FusedAttention calls it) and SiLU-and-mul, at SmolLM2-135M and Llama-7B widths, for
1 token (decode) and 128 tokens (prefill), float32 and bfloat16. Each is timed through the wrappers the dispatch calls,
after a parity check. The decode rows run SmolLM2-135M (the GGUF's asym_int4 blocks) under IPEX_LLM_TF_BACKEND=cpu
(every op ours), auto and ipex (every op ipex's), each in its own process. Timings are medians of repeated calls.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_ms, write_json

from ipex_llm_tf.kernels import ipex_ops
from ipex_llm_tf.kernels.reference import (
    rms_norm_reference,
    rotary_reference,
    silu_and_mul_reference,
)

# (name, hidden, heads, head_dim, intermediate)
SHAPES = [("smollm2-135m", 576, 9, 64, 1536), ("llama-7b", 4096, 32, 128, 11008)]
TOKENS = (1, 128)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. One stormy night,"


def _rope_tables(batch: int, seq: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = (torch.arange(100, 100 + seq).float()[:, None] * inv_freq)[None].expand(batch, -1, -1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def op_cases(shape: tuple, tokens: int, dtype: torch.dtype) -> dict[str, tuple]:
    """For each op: (ours, ipex's) zero-argument callables on inputs of this shape."""
    _, hidden, heads, head_dim, inter = shape
    x = torch.randn(1, tokens, hidden, dtype=dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    # FusedAttention hands RoPE a strided view of the merged qkv output, transposed to [batch, heads, seq, dim]
    qkv = torch.randn(1, tokens, heads * 2, head_dim, dtype=dtype)
    query = qkv[:, :, :heads].transpose(1, 2)
    cos, sin = _rope_tables(1, tokens, head_dim, dtype)
    gate_up = torch.randn(1, tokens, 2 * inter, dtype=dtype)
    return {
        "rms_norm": (lambda: rms_norm_reference(x, weight, 1e-5), lambda: ipex_ops.rms_norm(x, weight, 1e-5)),
        "rotary": (lambda: rotary_reference(query, cos, sin), lambda: ipex_ops.rotary(query, cos, sin)),
        "silu_mul": (lambda: silu_and_mul_reference(gate_up), lambda: ipex_ops.silu_mul(gate_up)),
    }


def bench_ops() -> list[dict]:
    """One row per (op, shape, tokens, dtype, implementation)."""
    rows = []
    for shape in SHAPES:
        for tokens in TOKENS:
            for dname, dtype in DTYPES.items():
                for op, (ours, theirs) in op_cases(shape, tokens, dtype).items():
                    err = float((ours().float() - theirs().float()).abs().max())
                    ours_us = time_ms(ours, warmup=3, min_seconds=0.2) * 1e3
                    ipex_us = time_ms(theirs, warmup=3, min_seconds=0.2) * 1e3
                    key = {"op": op, "shape": shape[0], "tokens": tokens, "dtype": dname}
                    rows.append({**key, "impl": "ours", "us": round(ours_us, 1), "vs_ours": "1.00"})
                    rows.append({**key, "impl": "ipex", "us": round(ipex_us, 1),
                                 "vs_ours": f"{ours_us / ipex_us:.2f}", "max_abs_diff": f"{err:.2g}"})
    return rows


def decode_case(backend: str, new_tokens: int, threads: int) -> dict:
    """Decode tok/s of SmolLM2-135M (GGUF asym_int4) under one IPEX_LLM_TF_BACKEND, in this process."""
    import ipex_llm_tf
    from ipex_llm_tf.bench import time_generate
    from ipex_llm_tf.gguf_import import find_default_gguf
    torch.set_num_threads(threads)
    model, tokenizer = ipex_llm_tf.AutoModelForCausalLM.from_gguf(find_default_gguf())
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    time_generate(model, ids, 4)  # warm-up, and ipex's import when the backend uses it
    first = min(time_generate(model, ids, 1) for _ in range(3))
    full = min(time_generate(model, ids, new_tokens) for _ in range(2))
    return {"first_token_ms": round(first * 1e3, 1), "tok_s": round((new_tokens - 1) / (full - first), 1)}


def bench_decode(new_tokens: int, threads: int, rounds: int) -> list[dict]:
    """Decode rows for IPEX_LLM_TF_BACKEND=cpu (ours), auto and ipex, each in a fresh process; best of rounds."""
    best: dict[str, dict] = {}
    # rounds alternate the backends, so that load from other jobs on a shared machine hits them all alike
    for _ in range(rounds):
        for backend in ("cpu", "auto", "ipex"):
            env = {**os.environ, "IPEX_LLM_TF_BACKEND": backend}
            out = subprocess.run([sys.executable, __file__, "--decode-case", backend, "--new-tokens",
                                  str(new_tokens), "--threads", str(threads)], env=env, capture_output=True,
                                 text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if backend not in best or row["tok_s"] > best[backend]["tok_s"]:
                best[backend] = row
    return [{"backend": backend, **row} for backend, row in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="decode runs per backend (the best is kept)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--decode-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode_case:
        print(json.dumps(decode_case(args.decode_case, args.new_tokens, args.threads)))
        return
    torch.set_num_threads(args.threads)
    ipex_ops.functional()  # import ipex before timing anything (and fail early where it is absent)
    rows = bench_ops()
    print_table(rows, ["op", "shape", "tokens", "dtype", "impl", "us", "vs_ours", "max_abs_diff"])
    decode = [] if args.no_decode else bench_decode(args.new_tokens, args.threads, args.rounds)
    if decode:
        print()
        print_table(decode, ["backend", "first_token_ms", "tok_s"])
    payload = {"ipex": ipex_ops.version(), "new_tokens": args.new_tokens, "ops": rows, "decode": decode}
    print(f"wrote {write_json('bench_ipex_ops', payload, args.json)}")


if __name__ == "__main__":
    main()
