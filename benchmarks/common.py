"""Small helpers shared by the benchmarks: timing, peak memory, table printing and JSON output."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from ipex_llm_tf.bench import peak_rss_mib  # noqa: F401  (re-exported for the benchmarks)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_ms(fn: Callable[[], object], warmup: int = 2, repeats: int = 10, min_seconds: float = 0.3) -> float:
    """Median wall time of fn() in milliseconds, after warm-up; repeats until min_seconds have passed."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start < min_seconds and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "platform": platform.platform()}


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    """Print rows as one aligned text table."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]  # rows may be none
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def write_json(name: str, payload: dict[str, object], path: "str | None" = None) -> Path:
    """Write payload (plus the machine description) as JSON; returns the file path."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    return out


def make_smollm2(directory: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write SmolLM2-135M (the embedded GGUF, dequantized) as a transformers safetensors directory + tokenizer."""
    import transformers
    from ipex_llm_tf.gguf_import import read_gguf
    checkpoint = read_gguf()
    from ipex_llm_tf.optimize import low_memory_init
    with low_memory_init():
        model = transformers.AutoModelForCausalLM.from_config(checkpoint.config)
    state = {t.hf_name: t.dequantize(torch.float32).to(dtype) for t in checkpoint.tensors}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.save_pretrained(directory)
    checkpoint.load_tokenizer().save_pretrained(directory)
