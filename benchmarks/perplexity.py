"""Perplexity of SmolLM2 (the embedded Q4_1 GGUF) on a fixed English text, for every low-bit format.

    python benchmarks/perplexity.py [--tokens 2048] [--formats sym_int4 nf4 ...] [--json PATH]

Rows: "unquantized" is a plain transformers model holding the GGUF's weights dequantized to fp32 (no ipex_llm_tf
layers; the reference every delta is taken against); "gguf native" keeps the file's Q4_1 blocks as asym_int4
(lossless, so it should match unquantized up to kernel rounding); one row per format re-quantizes the dequantized
GGUF weights with from_gguf(path, low_bit=fmt); "llama.cpp" runs the same file on the same tokens when
llama-cpp-python is installed, and "llama.cpp Q4_0" runs llama.cpp on a Q4_0 file its own quantizer makes from the
same GGUF in this run (the peer for sym_int4: same weights, same 4.5 bits). bits/weight is the storage cost of the quantized Linear layers (the embedding,
tied to lm_head, stays fp32 everywhere). One window of --tokens tokens; NLL is averaged in float64.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import tempfile
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, print_table, write_json  # noqa: E402

from ipex_llm_tf import AutoModelForCausalLM, get_format, list_formats  # noqa: E402
from ipex_llm_tf.gguf_import import find_default_gguf, read_gguf  # noqa: E402
from ipex_llm_tf.kernels import backend_for  # noqa: E402
from ipex_llm_tf.optimize import low_memory_init  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "apache-2.0.txt"


def mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean negative log-likelihood of ids[1:] given logits[:-1], computed in float64."""
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logprobs.gather(1, ids[1:, None]).mean())


def model_nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """One forward pass over the whole window."""
    with torch.inference_mode():
        return mean_nll(model(ids[None]).logits[0], ids)


def unquantized_model(path: Path) -> torch.nn.Module:
    """A plain fp32 transformers model holding the GGUF's dequantized weights."""
    checkpoint = read_gguf(path)
    with low_memory_init():  # the weights below replace every parameter, so skip the random init
        model = transformers.AutoModelForCausalLM.from_config(checkpoint.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict({t.hf_name: t.dequantize() for t in checkpoint.tensors},
                                                strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def llama_cpp_nll(path: Path, ids: torch.Tensor) -> "float | str":
    """llama.cpp's NLL on the same tokens, or why it could not run."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return "llama-cpp-python not installed"
    llm = Llama(model_path=str(path), n_ctx=max(2048, len(ids)), n_batch=len(ids), logits_all=True, verbose=False)
    llm.eval(ids.tolist())
    return mean_nll(torch.from_numpy(llm.scores[:len(ids)].copy()), ids)


def llama_cpp_requantize(path: Path, out_dir: Path, ftype_name: str = "LLAMA_FTYPE_MOSTLY_Q4_0") -> "Path | str":
    """A GGUF re-quantized by llama.cpp's own quantizer (allow_requantize), or why it could not be made."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.allow_requantize = True
    out = out_dir / f"{path.stem}.requantized.gguf"
    status = llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params))
    return out if status == 0 else f"llama_model_quantize failed with status {status}"


def file_bits_per_weight(path: Path) -> float:
    """Storage bits per weight of the GGUF's most common 2-D tensor type (what llama.cpp multiplies with)."""
    from gguf import GGML_QUANT_SIZES
    types = Counter(t.tensor_type for t in read_gguf(path).header.tensors if len(t.dims) == 2)
    block, size = GGML_QUANT_SIZES[types.most_common(1)[0][0]]
    return size * 8 / block


def main() -> None:
    """Measure every row, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="default: SmolLM2-135M-Instruct Q4_1")
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--formats", nargs="+", default=list_formats(), choices=list_formats(), metavar="FORMAT")
    parser.add_argument("--json", default=str(RESULTS_DIR / "perplexity.json"))
    args = parser.parse_args()
    path = args.gguf or find_default_gguf()
    tokenizer = read_gguf(path).load_tokenizer()
    ids = torch.tensor(tokenizer(args.text.read_text())["input_ids"][:args.tokens])
    backend = backend_for(torch.device("cpu"))  # the cpu backend's int4 kernel rounds differently from fp32
    print(f"{path.name}: {len(ids)} tokens of {args.text.name}, backend {backend}, {torch.get_num_threads()} threads",
          flush=True)

    rows: list[dict[str, object]] = []

    def add(name: str, bits: float, nll: "float | str", seconds: float) -> None:
        row = {"format": name, "bits/weight": round(bits, 3)}
        if isinstance(nll, str):
            row["note"] = nll
        else:
            row.update({"nll": round(nll, 5), "perplexity": round(math.exp(nll), 4), "seconds": round(seconds, 1)})
        rows.append(row)
        print(row, flush=True)

    start = time.perf_counter()
    add("unquantized (fp32)", 32.0, model_nll(unquantized_model(path), ids), time.perf_counter() - start)
    for fmt in [None, *args.formats]:  # None: the file's own blocks
        start = time.perf_counter()
        model, _ = AutoModelForCausalLM.from_gguf(path, low_bit=fmt)
        name = model.config.ipex_llm_tf["low_bit"]
        add(f"gguf native ({name})" if fmt is None else name, get_format(name).bits_per_weight, model_nll(model, ids),
            time.perf_counter() - start)
        del model
    start = time.perf_counter()
    add("llama.cpp", file_bits_per_weight(path), llama_cpp_nll(path, ids), time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        q4_0 = llama_cpp_requantize(path, Path(tmp))
        nll = q4_0 if isinstance(q4_0, str) else llama_cpp_nll(q4_0, ids)
        add("llama.cpp Q4_0 (its quantizer, same weights)", 4.5, nll, time.perf_counter() - start)

    reference = rows[0]["perplexity"]
    for row in rows:
        if "perplexity" in row:
            delta = row["perplexity"] - reference
            row["delta"] = f"{delta:+.4f} ({delta / reference:+.2%})"
    print()
    print_table(rows, ["format", "bits/weight", "perplexity", "delta", "seconds", "note"])
    out = write_json("perplexity", {"gguf": path.name, "text": args.text.name, "tokens": len(ids), "backend": backend,
                                    "reference": "unquantized (fp32)", "rows": rows}, args.json)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
