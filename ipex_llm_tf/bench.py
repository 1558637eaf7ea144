"""What `ipex-llm-tf bench` and `ipex-llm-tf info` report: latency per format, devices, backends, versions."""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch


def peak_memory_mib(device: "torch.device | str" = "cpu") -> float:
    """Peak memory so far: the accelerator's allocator peak, or the process's peak RSS on CPU."""
    device = torch.device(device)
    if device.type in ("cuda", "xpu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    Reads VmHWM, which starts afresh at exec; ru_maxrss can carry over the parent's peak into a spawned child.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: "torch.device | str") -> None:
    """Wait for queued work on an accelerator (a no-op on CPU)."""
    device = torch.device(device)
    if device.type in ("cuda", "xpu"):
        getattr(torch, device.type).synchronize(device)


class BlockTokens:
    """A logits processor that rules the given tokens out (their scores to -inf) with one in-place write a step.
    Timed generations block end-of-sequence this way, as llama.cpp's ignore-EOS does: transformers' own
    min_new_tokens does it with an arange over the vocabulary and an isin every step (SmolLM2's 49152 entries on the
    2-core CPU: 233 us a step against 2.3 us here, 1.5-2% of a decode step, which llama.cpp rows never paid)."""

    def __init__(self, token_ids: "int | list[int]") -> None:
        self.token_ids = sorted({token_ids} if isinstance(token_ids, int) else set(token_ids))
        self._index: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """scores with the blocked tokens' columns at -inf (written in place: generate() hands over its own copy)."""
        if self._index is None or self._index.device != scores.device:
            self._index = torch.tensor(self.token_ids, dtype=torch.long, device=scores.device)
        return scores.index_fill_(1, self._index, float("-inf"))


def time_generate(model, ids: torch.Tensor, new_tokens: int, **generate_kwargs) -> float:
    """Seconds for a greedy generate of exactly new_tokens tokens (extra keyword arguments go to generate), the
    model's end-of-sequence tokens blocked (BlockTokens)."""
    from transformers import LogitsProcessorList
    eos = model.generation_config.eos_token_id
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    if eos is not None:
        processors.append(BlockTokens(eos))
    synchronize(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, logits_processor=processors, **generate_kwargs)
    synchronize(model.device)
    return time.perf_counter() - start


class TokenClock:
    """A generate() stopping criterion that never stops: it notes the time each new token reaches the stopping
    check. generate() syncs with the device once a token, so in steady decoding the gaps are the device's pace."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._never: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """False for every row (made once, so the check adds no device work), after noting the time."""
        self.times.append(time.perf_counter())
        if self._never is None or self._never.shape[0] != input_ids.shape[0] or self._never.device != input_ids.device:
            self._never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._never


def median_token_ms(model, ids: torch.Tensor, new_tokens: int, **generate_kwargs) -> float:
    """Median ms between consecutive tokens of one greedy generate() of new_tokens (>= 3) tokens: a next-token
    latency that a pause of the host (which moves a whole call's time) does not shift."""
    if new_tokens < 3:
        raise ValueError(f"median_token_ms needs at least 3 new tokens (2 gaps), got {new_tokens}")
    from transformers import StoppingCriteriaList
    clock = TokenClock()
    time_generate(model, ids, new_tokens, stopping_criteria=StoppingCriteriaList([clock]), **generate_kwargs)
    return statistics.median(b - a for a, b in zip(clock.times, clock.times[1:])) * 1e3


def bench_formats(args: argparse.Namespace) -> int:
    """Table of warm-up, first-token and next-token latency for each requested format; CSV + JSON files."""
    from .cli import UserError, load_model
    for path in (args.csv, args.json):  # fail before minutes of benchmarking, not after
        if not Path(path).resolve().parent.is_dir():
            raise UserError(f"cannot write {path}: folder {Path(path).resolve().parent} does not exist")
    rows = []
    for low_bit in args.low_bits:
        model, _ = load_model(args.model, low_bit, args.device, args.quiet)
        ids = torch.randint(100, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        ids = ids.to(model.device)
        warmup = time_generate(model, ids, 2)
        first = min(time_generate(model, ids, 1) for _ in range(3))
        full = min(time_generate(model, ids, args.new_tokens) for _ in range(2))
        # one new token has no next-token latency, and timing noise can make a short run's difference <= 0
        next_ms = (full - first) / (args.new_tokens - 1) * 1e3 if args.new_tokens > 1 else 0.0
        rows.append({"low_bit": model.config.ipex_llm_tf["low_bit"], "device": str(model.device),
                     "warmup_ms": round(warmup * 1e3, 1), "first_token_ms": round(first * 1e3, 1),
                     "next_token_ms": round(next_ms, 2) if next_ms > 0 else None,
                     "tokens_per_s": round(1e3 / next_ms, 1) if next_ms > 0 else None,
                     "peak_memory_mib": round(peak_memory_mib(model.device), 1)})
        del model
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(args.json, "w") as handle:
        json.dump({"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": rows}, handle,
                  indent=1)
    print(f"wrote {args.csv} and {args.json} (warm-up is the first, untimed-in-the-others run: compile and cache "
          f"fill happen there)")
    return 0


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> str:
    """Devices and backends found, which backend each device uses and why, and package versions."""
    from .devices import available_devices
    from .kernels import backend_for, requested_backend, triton_available
    lines = [f"devices: {', '.join(available_devices())} (auto picks {available_devices()[0]})"]
    for dev in available_devices():
        backend = backend_for(torch.device(dev))
        why = {"cpu": "PyTorch's packed int4 kernel for ggml formats, dequantize + BLAS for the rest",
               "triton": "Triton kernels (one source for CUDA and XPU)",
               "torch": "pure-PyTorch reference (Triton missing or IPEX_LLM_TF_BACKEND=torch)"}[backend]
        lines.append(f"  {dev}: backend {backend}: {why}")
    lines.append(f"IPEX_LLM_TF_BACKEND={requested_backend()}")
    lines.append(f"triton: {'available' if triton_available() else 'not installed'}")
    lines.append(f"intel-extension-for-pytorch: {_version('intel-extension-for-pytorch')} (optional, never required)")
    for package in ("ipex-llm-tf", "torch", "transformers", "safetensors", "gguf", "huggingface_hub"):
        lines.append(f"{package}: {_version(package)}")
    lines.append(f"python: {platform.python_version()} on {platform.platform()}")
    return "\n".join(lines)
