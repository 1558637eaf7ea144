"""CPU decode on SmolLM2-135M: first-token and next-token latency, tokens/s and peak RSS, ours vs peers.

    python benchmarks/bench_decode.py [--threads 2] [--new-tokens 128] [--json PATH]

Rows (each in its own process): transformers fp32 eager on the dequantized GGUF, ours asym_int4 (the GGUF's Q4_1
blocks, lossless), ours sym_int4 in float32 (float32 head, transformers' default) and in the checkpoint's bfloat16
(from_pretrained's default dtype, so a bfloat16 head), sym_int4 with mixed_precision=True (head and tied embedding
in sym_int8, as llama.cpp keeps them) and sym_int8 (re-quantized), and llama.cpp on the same GGUF when
llama-cpp-python is installed. "compiled decode" rows run the one-token steps through torch.compile
(IPEX_LLM_TF_COMPILE_CPU_DECODE=1); their warm-up column includes the compile. Prompt: the fixed 33-token sentence of
../shared/anchors/results-cpu.md, greedy, EOS masked.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_smollm2, peak_rss_mib, print_table, write_json  # noqa: E402

PROMPT = ("The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. One stormy night in "
          "November, he noticed a small boat drifting toward the rocks, so he")
COMPILED = " compiled decode"
BF16 = "(bf16, default dtype)"  # from_pretrained without dtype: the checkpoint's bfloat16  # the case with IPEX_LLM_TF_COMPILE_CPU_DECODE=1 (models/compiled_step.py)
CASES = ("transformers fp32", "transformers bf16", "ours asym_int4 (GGUF, lossless)",
         "ours asym_int4 (GGUF, lossless)" + COMPILED, "ours sym_int4", "ours sym_int4" + COMPILED,
         "ours sym_int4 " + BF16, "ours sym_int4 " + BF16 + COMPILED,
         "ours sym_int4 mixed_precision",
         "ours sym_int4 mixed_precision" + COMPILED, "ours sym_int8", "llama.cpp Q4_1")


def _hf_timings(model, ids, long_ids, new_tokens: int) -> dict:
    from ipex_llm_tf.bench import time_generate
    warmup = time_generate(model, ids, 4)  # a compiled decode step compiles here
    first = min(time_generate(model, ids, 1) for _ in range(3))
    full = min(time_generate(model, ids, new_tokens) for _ in range(2))
    first_long = min(time_generate(model, long_ids, 1) for _ in range(2))
    return {"first_token_ms": round(first * 1e3, 1), "tok_s": round((new_tokens - 1) / (full - first), 1),
            "first_token_1024_ms": round(first_long * 1e3, 1), "warmup_s": round(warmup, 1)}


def _llama_cpp_timings(gguf: Path, ids: list[int], long_ids: list[int], new_tokens: int) -> dict:
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
    start = time.perf_counter()
    llm.reset()
    llm.eval(ids)
    first = time.perf_counter() - start
    start = time.perf_counter()
    token = int(np.argmax(llm.eval_logits[-1] if llm.eval_logits else llm.scores[llm.n_tokens - 1]))
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    tok_s = (new_tokens - 1) / (time.perf_counter() - start)
    llm.reset()
    start = time.perf_counter()
    llm.eval(long_ids)
    first_long = time.perf_counter() - start
    return {"first_token_ms": round(first * 1e3, 1), "tok_s": round(tok_s, 1),
            "first_token_1024_ms": round(first_long * 1e3, 1)}


def run_case(case: str, source: Path, new_tokens: int, threads: int) -> dict:
    import torch
    import transformers
    import ipex_llm_tf
    from ipex_llm_tf.gguf_import import find_default_gguf
    torch.set_num_threads(threads)
    if case.endswith(COMPILED):
        os.environ["IPEX_LLM_TF_COMPILE_CPU_DECODE"] = "1"
        case = case[:-len(COMPILED)]
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    long_ids = ids.repeat(1, 1024 // ids.shape[1] + 1)[:, :1024]
    if case.startswith("llama.cpp"):
        try:
            timings = _llama_cpp_timings(find_default_gguf(), ids[0].tolist(), long_ids[0].tolist(), new_tokens)
        except ImportError:
            return {"note": "llama-cpp-python not installed"}
    else:
        if case.startswith("transformers"):
            dtype = torch.float32 if case.endswith("fp32") else torch.bfloat16
            model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
        elif case.startswith("ours asym_int4"):
            model, _ = ipex_llm_tf.AutoModelForCausalLM.from_gguf(find_default_gguf())
        else:  # "ours <format>[ mixed_precision]": mixed_precision puts lm_head (tied to the embedding) in sym_int8
            dtype = {} if case.endswith(BF16) else {"dtype": torch.float32}
            model = ipex_llm_tf.AutoModelForCausalLM.from_pretrained(source, load_in_low_bit=case.split()[1],
                                                                     mixed_precision=case.endswith("mixed_precision"),
                                                                     **dtype)
        timings = _hf_timings(model, ids, long_ids, new_tokens)
    return {**timings, "peak_rss_mib": round(peak_rss_mib(), 1), "prompt_tokens": int(ids.shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--json", default=None)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.source), args.new_tokens, args.threads)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        source = Path(tmp) / "smollm2"
        make_smollm2(source)
        for case in args.cases:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--source", str(source), "--new-tokens",
                                  str(args.new_tokens), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            rows.append({"system": case, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(f"  {case} done", file=sys.stderr)
    print_table(rows, ["system", "first_token_ms", "first_token_1024_ms", "tok_s", "peak_rss_mib", "warmup_s",
                       "prompt_tokens", "note"])
    print(f"wrote {write_json('bench_decode', {'new_tokens': args.new_tokens, 'rows': rows}, args.json)}")


if __name__ == "__main__":
    main()
