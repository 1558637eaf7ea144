"""GPU decode, Llama-2-7B shape with random weights: ours per format and the peers, all in one run, one table.

    python benchmarks/bench_gpu.py [--formats sym_int4 sym_int8 ...] [--peers fp16 fp16-compile int4-compile
                                                                        torchao-int4-compile]
                                   [--batches 4 16] [--mixed-precision] [--fp8-kv] [--prefill-chunk 512]
                                   [--new-tokens 128] [--json PATH]

Batch 1, 32-token prompt, greedy with EOS masked. next-token ms = (T(generate 1+N) - T(generate 1)) / N, after two
warm-up runs at those lengths (compiles and graph captures happen there; warmup_ms is the first of them);
next_token_median_ms = the median gap between consecutive tokens of one more generate 1+N (bench.median_token_ms:
a host pause moves one gap, not the whole call's time as it moves the difference of two calls).
Also: first token for a 1024-token prompt, and peak GPU memory of a 2048-token context (the fp16 model a low-bit one
was quantized from is freed first). For our rows also: next-token ms after a 1984-token prompt (63 steps, same
method), and step_replay_ms, the device time of one batch-1 step at the 32-token prompt's span from back-to-back
CUDA graph replays (GraphDecoder.replay_ms): free of the host noise that moves next-token ms by up to 25% between
rounds on the lent H100s.
Peer rows are built by gpu_peers.py (the torchao row needs its wheel installed); bitsandbytes figures are in
../shared/anchors (its wheel is not on the device).
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
from gpu_peers import to_int4pack, to_torchao_int4  # noqa: E402

import ipex_llm_tf  # noqa: E402
import ipex_llm_tf.devices  # noqa: E402
from ipex_llm_tf.bench import median_token_ms, peak_memory_mib, synchronize, time_generate  # noqa: E402
from ipex_llm_tf.models.graph_decode import graph_decoder  # noqa: E402

PEERS = {  # name -> (row label, bits/weight, builder from the fp16 model, generate keyword arguments)
    "fp16": ("transformers fp16 eager", 16, lambda m: m, {}),
    "fp16-compile": ("transformers fp16 static+compile", 16, lambda m: m, {"cache_implementation": "static"}),
    "int4-compile": ("torch _weight_int4pack_mm g128 static+compile", 4.25, to_int4pack,
                     {"cache_implementation": "static"}),
    "torchao-int4-compile": ("torchao Int4WeightOnlyConfig g128 static+compile", 4.25, to_torchao_int4,
                             {"cache_implementation": "static"}),
}


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


def measure_batches(name: str, model, device: str, new_tokens: int, bits: float, batches: list[int],
                    **generate_kwargs) -> list[dict]:
    """next-token latency and tokens/s (all rows) at each batch size: 32-token prompts, after a warm-up run."""
    rows = []
    for batch in batches:
        ids = torch.randint(100, 30000, (batch, 32), device=device, generator=torch.Generator(device).manual_seed(1))
        time_generate(model, ids, 1 + new_tokens, **generate_kwargs)
        first = min(time_generate(model, ids, 1, **generate_kwargs) for _ in range(2))
        full = min(time_generate(model, ids, 1 + new_tokens, **generate_kwargs) for _ in range(2))
        next_ms = (full - first) / new_tokens * 1e3
        rows.append({"system": f"{name} (batch {batch})", "bits/weight": bits, "next_token_ms": round(next_ms, 2),
                     "tok_s": round(batch * 1e3 / next_ms, 1)})
    return rows


def measure(name: str, model, device: str, new_tokens: int, bits: float, long_context: bool = False,
            **generate_kwargs) -> dict:
    """One system's batch-1 row; long_context also times decode after a 1984-token prompt (our rows only: a static
    cache of a second length would make a compiled peer recompile)."""
    ids = torch.randint(100, 30000, (1, 32), device=device, generator=torch.Generator(device).manual_seed(0))
    warm = time_generate(model, ids, 1 + new_tokens, **generate_kwargs)
    time_generate(model, ids, 1, **generate_kwargs)
    first = min(time_generate(model, ids, 1, **generate_kwargs) for _ in range(3))
    full = min(time_generate(model, ids, 1 + new_tokens, **generate_kwargs) for _ in range(2))
    next_ms = (full - first) / new_tokens * 1e3
    median_ms = median_token_ms(model, ids, 1 + new_tokens, **generate_kwargs)
    long_ids = torch.randint(100, 30000, (1, 1024), device=device)
    first_1024 = min(time_generate(model, long_ids, 1, **generate_kwargs) for _ in range(3))
    if device in ("cuda", "xpu"):
        getattr(torch, device).reset_peak_memory_stats()
    ids_2k = torch.randint(100, 30000, (1, 1984), device=device)
    time_generate(model, ids_2k, 64, **generate_kwargs)
    row = {"system": name, "bits/weight": bits, "warmup_ms": round(warm * 1e3, 1),
           "first_token_ms": round(first * 1e3, 2), "next_token_ms": round(next_ms, 2),
           "next_token_median_ms": round(median_ms, 3),
           "tok_s": round(1e3 / next_ms, 1), "first_token_1024_ms": round(first_1024 * 1e3, 1),
           "peak_gib_2k_ctx": round(peak_memory_mib(device) / 1024, 2)}
    if long_context:  # the peak run above was the warm-up (graph storage grown, spans captured)
        first_2k = min(time_generate(model, ids_2k, 1, **generate_kwargs) for _ in range(2))
        full_2k = min(time_generate(model, ids_2k, 64, **generate_kwargs) for _ in range(2))
        row["next_token_2k_ms"] = round((full_2k - first_2k) / 63 * 1e3, 2)
    decoder = graph_decoder(model)
    if decoder is not None:
        row["graph_captures"] = f"{decoder.stats.captures} in {decoder.stats.capture_seconds:.2f} s"
        # prompts replayed from graphs of their padded length (models/prompt_graphs.py), and what recording cost
        row["prompt_graphs"] = (f"{decoder.stats.prompt_captures} in {decoder.stats.prompt_capture_seconds:.2f} s, "
                                f"{decoder.stats.prompt_replays} replays")
        # greedy steps replayed early (models/early_steps.py) and how many of those generate() then asked for
        row["early_steps"] = f"{decoder.stats.early_hits}/{decoder.stats.early_steps}"
        time_generate(model, ids, 1 + new_tokens, **generate_kwargs)  # the 2k runs regrew the storage: re-record
        replay = decoder.replay_ms(1)
        row["step_replay_ms"] = None if replay is None else round(replay, 3)
    return row


def _free(device: str) -> None:
    gc.collect()
    if device in ("cuda", "xpu"):
        getattr(torch, device).empty_cache()


def report(name: str, rows: list[dict]) -> None:
    """One stderr line per finished system, so a run cut off before the table still shows what it measured."""
    cells = ", ".join(f"{row['system'].removeprefix(name).strip() or 'batch 1'} "
                      f"{row.get('next_token_ms', row.get('note'))}" for row in rows)
    print(f"  {name} done (next-token ms: {cells})", file=sys.stderr, flush=True)


def measure_ours(args: argparse.Namespace, device: str) -> list[dict]:
    """Our rows: each format quantized from the fp16 model, then measured as the peers are."""
    rows = []
    for fmt in args.formats:
        model = build(device, args.tiny)
        start = time.perf_counter()
        model = ipex_llm_tf.optimize_model(model, low_bit=fmt, mixed_precision=args.mixed_precision,
                                           quantize_kv_cache=args.fp8_kv, cpu_embedding=args.cpu_embedding,
                                           modules_to_not_convert=[] if args.quantize_head else None)
        synchronize(device)
        quantize_s = time.perf_counter() - start
        _free(device)
        label = f"ours {fmt}" + (" mixed_precision" if args.mixed_precision else "") + (" fp8 KV" if args.fp8_kv else "")
        label += " head quantized" if args.quantize_head else ""
        label += " cpu_embedding" if args.cpu_embedding else ""
        ours_kwargs = {}
        if args.prefill_chunk:
            label += f" prefill chunks {args.prefill_chunk}"
            ours_kwargs["prefill_chunk_size"] = args.prefill_chunk
        row = measure(label, model, device, args.new_tokens, ipex_llm_tf.get_format(fmt).bits_per_weight, True,
                      **ours_kwargs)
        batch_rows = measure_batches(label, model, device, args.new_tokens, row["bits/weight"], args.batches,
                                     **ours_kwargs)
        rows += [{**row, "quantize_s": round(quantize_s, 1)}] + batch_rows
        report(label, [row] + batch_rows)
        model = None
        _free(device)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["sym_int4", "asym_int4", "sym_int8", "nf4", "fp8_e4m3"])
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="*", default=[4, 16], help="extra batch sizes (tokens/s rows)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a smoke test")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="our rows with mixed_precision=True (lm_head in sym_int8)")
    parser.add_argument("--quantize-head", action="store_true",
                        help="our rows quantize lm_head to their own format too (modules_to_not_convert=[]), as the "
                             "peer rows quantize every Linear")
    parser.add_argument("--cpu-embedding", action="store_true",
                        help="our rows keep the embedding table on the CPU (cpu_embedding=True)")
    parser.add_argument("--fp8-kv", action="store_true",
                        help="our rows with quantize_kv_cache=True (float8 keys and values in the graph storage)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="our rows prefill in chunks of this many tokens (generate's prefill_chunk_size)")
    parser.add_argument("--ours-first", action="store_true",
                        help="measure our rows before the peers (a compiled peer leaves its state in the process)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = ipex_llm_tf.devices.best_device()
    rows = []
    if args.ours_first:
        rows += measure_ours(args, device)
    for peer in args.peers:
        label, bits, make, generate_kwargs = PEERS[peer]
        try:
            model = make(build(device, args.tiny))
            peer_rows = [measure(label, model, device, args.new_tokens, bits, **generate_kwargs)]
            peer_rows += measure_batches(label, model, device, args.new_tokens, bits, args.batches, **generate_kwargs)
        except Exception as err:  # a peer that cannot run here is reported, not fatal
            peer_rows = [{"system": label, "bits/weight": bits, "note": f"{type(err).__name__}: {err}"[:120]}]
        rows += peer_rows
        model = None
        torch._dynamo.reset()
        _free(device)
        report(label, peer_rows)
    if not args.ours_first:
        rows += measure_ours(args, device)
    print_table(rows, ["system", "bits/weight", "next_token_ms", "next_token_median_ms", "tok_s", "first_token_ms",
                       "first_token_1024_ms", "next_token_2k_ms", "step_replay_ms", "peak_gib_2k_ctx", "warmup_ms",
                       "graph_captures", "prompt_graphs", "early_steps", "quantize_s", "note"])
    gpu = getattr(torch, device).get_device_name() if device in ("cuda", "xpu") else device
    print(f"wrote {write_json('bench_gpu', {'gpu': gpu, 'rows': rows}, args.json)}")


if __name__ == "__main__":
    main()
