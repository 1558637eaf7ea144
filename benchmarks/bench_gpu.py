"""GPU decode, Llama-2-7B shape with random weights: ours per format vs transformers fp16 eager, in one run.

    python benchmarks/bench_gpu.py [--formats sym_int4 sym_int8 ...] [--new-tokens 128] [--json PATH]

Batch 1, 32-token prompt, greedy with EOS masked. next-token ms = (T(generate 1+N) - T(generate 1)) / N.
Also: first token for a 1024-token prompt, and peak GPU memory of a 2048-token context for the low-bit model alone
(the fp16 model it was quantized from is freed first). Peers measured elsewhere are in ../shared/anchors.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

import ipex_llm_tf  # noqa: E402
import ipex_llm_tf.devices  # noqa: E402
from ipex_llm_tf.bench import peak_memory_mib, synchronize, time_generate  # noqa: E402


def build(device: str, tiny: bool) -> torch.nn.Module:
    size = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4) if tiny else dict(hidden_size=4096, intermediate_size=11008,
                                                         num_hidden_layers=32, num_attention_heads=32,
                                                         num_key_value_heads=32)
    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **size)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.float16)
    return model.eval()


def measure(name: str, model, device: str, new_tokens: int, bits: float) -> dict:
    ids = torch.randint(100, 30000, (1, 32), device=device, generator=torch.Generator(device).manual_seed(0))
    warm = time_generate(model, ids, 4)
    first = min(time_generate(model, ids, 1) for _ in range(3))
    full = min(time_generate(model, ids, 1 + new_tokens) for _ in range(2))
    next_ms = (full - first) / new_tokens * 1e3
    long_ids = torch.randint(100, 30000, (1, 1024), device=device)
    first_1024 = min(time_generate(model, long_ids, 1) for _ in range(2))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    time_generate(model, torch.randint(100, 30000, (1, 1984), device=device), 64)
    return {"system": name, "bits/weight": bits, "warmup_ms": round(warm * 1e3, 1),
            "first_token_ms": round(first * 1e3, 2), "next_token_ms": round(next_ms, 2),
            "tok_s": round(1e3 / next_ms, 1), "first_token_1024_ms": round(first_1024 * 1e3, 1),
            "peak_gib_2k_ctx": round(peak_memory_mib(device) / 1024, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["sym_int4", "asym_int4", "sym_int8", "nf4", "fp8_e4m3"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a smoke test")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = ipex_llm_tf.devices.best_device()
    rows = []
    model = build(device, args.tiny)
    rows.append(measure("transformers fp16 eager", model, device, args.new_tokens, 16))
    for fmt in args.formats:
        if model is None:
            model = build(device, args.tiny)
        start = time.perf_counter()
        model = ipex_llm_tf.optimize_model(model, low_bit=fmt)
        synchronize(device)
        quantize_s = time.perf_counter() - start
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        row = measure(f"ours {fmt}", model, device, args.new_tokens, ipex_llm_tf.get_format(fmt).bits_per_weight)
        rows.append({**row, "quantize_s": round(quantize_s, 1)})
        print(f"  {fmt} done", file=sys.stderr, flush=True)
        model = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["system", "bits/weight", "next_token_ms", "tok_s", "first_token_ms", "first_token_1024_ms",
                       "peak_gib_2k_ctx", "warmup_ms", "quantize_s"])
    gpu = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"wrote {write_json('bench_gpu', {'gpu': gpu, 'rows': rows}, args.json)}")


if __name__ == "__main__":
    main()
