"""Load time and peak RSS: ours from_pretrained(load_in_4bit), load_low_bit and from_gguf vs transformers' fp32 load.

    python benchmarks/bench_load.py [--models smollm2 llama-1b] [--json PATH]

Models: SmolLM2-135M (the GGUF dequantized once into a bf16 safetensors directory) and a generated Llama of ~1.1B
parameters (TinyLlama's shape, random bf16 weights written once). SmolLM2 also loads from its GGUF (from_gguf, Q4_1
blocks kept), beside the floor any such process starts from: importing torch, transformers' Llama and this package.
Every case runs in its own process so that each peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_smollm2, peak_rss_mib, print_table, write_json  # noqa: E402

CASES = ("transformers fp32", "ours from_pretrained sym_int4", "ours load_low_bit sym_int4")
GGUF_CASES = ("imports only (torch, transformers' Llama, ipex_llm_tf)", "ours from_gguf (asym_int4, lossless)")


def make_llama_1b(directory: Path) -> None:
    import torch
    import transformers
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                      tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(directory)


def run_case(case: str, source: Path, saved: Path) -> dict:
    import torch
    import transformers
    import ipex_llm_tf
    torch.set_num_threads(2)
    start = time.perf_counter()
    if case == "transformers fp32":
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    elif case == "ours from_pretrained sym_int4":
        model = ipex_llm_tf.AutoModelForCausalLM.from_pretrained(source, load_in_4bit=True)
        if not saved.exists():
            model.save_low_bit(saved)
    elif case == "ours load_low_bit sym_int4":
        model = ipex_llm_tf.AutoModelForCausalLM.load_low_bit(saved)
    elif case == GGUF_CASES[1]:
        from ipex_llm_tf.gguf_import import find_default_gguf
        model, _ = ipex_llm_tf.AutoModelForCausalLM.from_gguf(find_default_gguf())
    else:
        from transformers import LlamaForCausalLM  # noqa: F401  (what every case imports before loading)
        model = torch.nn.Module()
    seconds = time.perf_counter() - start
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak_rss_mib(), 1),
            "model_mib": round(size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama-1b"], choices=["smollm2", "llama-1b"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--saved", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one measurement
        print(json.dumps(run_case(args.case, Path(args.source), Path(args.saved))))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        for name in args.models:
            source, saved = Path(tmp) / name, Path(tmp) / f"{name}-int4"
            (make_smollm2 if name == "smollm2" else make_llama_1b)(source)
            for case in CASES + (GGUF_CASES if name == "smollm2" else ()):
                out = subprocess.run([sys.executable, __file__, "--case", case, "--source", str(source),
                                      "--saved", str(saved)], capture_output=True, text=True, check=True)
                rows.append({"model": name, "case": case, **json.loads(out.stdout.strip().splitlines()[-1])})
                print(f"  {name}: {case} done", file=sys.stderr)
    print_table(rows, ["model", "case", "seconds", "peak_rss_mib", "model_mib"])
    print(f"wrote {write_json('bench_load', {'rows': rows}, args.json)}")


if __name__ == "__main__":
    main()
