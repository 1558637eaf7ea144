"""Launch configurations of the Triton low-bit matmuls and their autotuning (used by triton_linear).

Configurations come from a heuristic; with IPEX_LLM_TF_TRITON_AUTOTUNE=1 (the default on CUDA) the first call for
each (path, format kind, M bucket, N, K, dtype) times a few candidates and keeps the fastest for the rest of the
process, and on disk for later ones (tuning_cache). Tuning is skipped inside graph capture, under the Triton
interpreter and when the variable is 0.

Decode launches (a few rows) on CUDA are timed as graph decode runs them: one CUDA graph of the launch on several
replicas of the weight back to back, so each reads its weight from memory and no host time is counted.
triton.testing.do_bench, which times the rest, zeroes a 256 MB buffer before each call to clear L2; the dirty lines
it leaves cost the next kernel ~17 us of write-back on an H100, more than a whole 7B decode GEMV (7-15 us), and its
picks were up to 25% slower than the best tile (session 12). XPU keeps do_bench: graph decode there is opt-in.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import triton

from ..devices import collector_paused, free_random_generator
from . import tuning_cache
from .grids import next_power_of_2


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_w: int       # words (block formats) or elements (fp8) per K step
    num_warps: int
    split_k: int = 1
    prefetch: int = 2  # 0: none, 1: next step's weights, 2: next step's weights and activations
    block_m: int = 1   # activation rows a program serves (block formats' words kernel: 1, 2 or 4)


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int       # weights per K step (a multiple of 32)
    num_warps: int
    num_stages: int
    split_k: int = 1
    group_m: int = 8
    swap: bool = False  # the transposed tile (decoded weights as the dot's first operand)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def capturing(device: torch.device) -> bool:
    """Whether the device's current stream is capturing a graph (nothing may be timed or allocated afresh then)."""
    check = getattr(getattr(torch, device.type, None), "is_current_stream_capturing", None)
    return bool(check is not None and check())


def autotune_enabled(device: torch.device) -> bool:
    if device.type not in ("cuda", "xpu") or _interpreting():
        return False
    if os.environ.get("IPEX_LLM_TF_TRITON_AUTOTUNE", "1").strip() in ("0", "false", "no", ""):
        return False
    return not capturing(device)  # nothing may be timed (or synchronized) inside a graph capture


_SM_COUNT: dict[torch.device, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (CUDA) / Xe cores (XPU) of the device; 8 for the interpreter."""
    if device not in _SM_COUNT:
        count = 8
        if device.type == "cuda":
            count = torch.cuda.get_device_properties(device).multi_processor_count
        elif device.type == "xpu":
            props = torch.xpu.get_device_properties(device)
            count = int(getattr(props, "gpu_subslice_count", 0) or getattr(props, "max_compute_units", 64) // 8 or 8)
        _SM_COUNT[device] = count
    return _SM_COUNT[device]


def _row_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


_TUNED: dict[tuple, object] = {}


_SCOPES: dict[torch.device, str] = {}


def _scope(device: torch.device) -> str:
    """Where stored tuning choices hold: this device's name, Triton's version and the kernel sources."""
    if device not in _SCOPES:
        name = getattr(torch, device.type).get_device_name(device)
        here = Path(__file__).parent
        sources = hashlib.sha256()
        for module in ("triton_gemv", "triton_gemv_tiles", "triton_gemv_planes", "triton_gemv_fp8", "triton_matmul",
                       "triton_linear", "triton_operands", "triton_tuning", "launch_overlap", "lane_lookup"):
            sources.update((here / f"{module}.py").read_bytes())
        _SCOPES[device] = f"{name} | triton {triton.__version__} | {sources.hexdigest()[:16]}"
    return _SCOPES[device]


# Autotuning by graph replays rotates through this many bytes of weight replicas (a few times an H100's 50 MB L2),
# at most _MAX_REPLICAS of them; they live only while the candidates are timed.
_ROTATION_BYTES = 160 << 20
_MAX_REPLICAS = 8
_REPLAYS = 10


def replicas_for(operands: Any) -> list:
    """operands plus enough copies (operands.replica()) that launches rotating through them read from memory."""
    count = min(_MAX_REPLICAS, max(1, -(-_ROTATION_BYTES // max(1, operands.nbytes()))))
    try:
        return [operands] + [operands.replica() for _ in range(count - 1)]
    except torch.OutOfMemoryError:  # too little memory to spare: time on the one weight
        return [operands]


_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _replay_ms(calls: Sequence[Callable[[], object]], device: torch.device) -> float:
    """Best per-call ms of `calls` recorded back to back in one CUDA graph and replayed (decode's conditions)."""
    # one side stream per device: cuBLAS keeps a workspace per stream for the life of the process
    stream = _WARMUP_STREAMS.setdefault(device, torch.cuda.Stream(device))
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # compiles, and raises for a candidate the device cannot run, before capture
        for call in calls:
            call()
    # captured on the side stream directly: torch.cuda.graph() would also synchronize and empty the cache for every
    # candidate timed
    graph = torch.cuda.CUDAGraph()
    try:
        with collector_paused(), torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                for call in calls:
                    call()
            finally:
                graph.capture_end()
    except Exception:  # the caller skips this candidate; later random draws must still work
        free_random_generator(torch.cuda, device)
        raise
    torch.cuda.current_stream(device).wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(_REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / (_REPLAYS * len(calls)))
    return best


def _pick(key: tuple, candidates: list, run: Callable[..., object], device: torch.device,
          operands: Any = None):
    """candidates[0], or with autotuning on the fastest candidate for this key: timed once, then remembered for this
    process and (tuning_cache) later ones. run(candidate) launches one; with `operands` (a decode launch's weight
    operands) run(candidate, replica) launches it on a replica and CUDA times it by graph replays."""
    if key in _TUNED:
        return _TUNED[key]
    if len(candidates) == 1 or not autotune_enabled(device):
        return candidates[0]
    stored = tuning_cache.lookup(_scope(device), key, candidates)
    if stored is not None:
        _TUNED[key] = stored
        return stored
    from triton.testing import do_bench

    if operands is not None and device.type == "cuda":
        replicas = replicas_for(operands)

        def time_ms(cfg):
            return _replay_ms([lambda r=r: run(cfg, r) for r in replicas], device)
    else:
        def time_ms(cfg):
            return do_bench(lambda: run(cfg), warmup=5, rep=25, return_mode="median")

    best, best_ms = candidates[0], float("inf")
    for cfg in dict.fromkeys(candidates):
        try:
            ms = time_ms(cfg)
        except Exception:  # a candidate that does not compile on this device (shared memory, registers)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    tuning_cache.store(_scope(device), key, best)
    return best


def tuned_configs() -> dict[tuple, object]:
    """Every choice autotuning made so far (for benchmarks and debugging): a config, or a launcher's name."""
    return {key: (choice[1] or choice[0].__name__) if isinstance(choice, tuple) else choice
            for key, choice in _TUNED.items()}


def _split_for(programs: int, steps: int, device: torch.device, per_sm: int = 2) -> int:
    """K splits so that about `per_sm` programs per SM are in flight, leaving each split a few K steps."""
    target = per_sm * sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(16, -(-target // programs), steps // 4))


# GEMV tiles (block_n, block_w, num_warps, prefetch, may split K), the heuristic choice first. Every thread loads
# 16 bytes of codes per row it owns and step (rows per thread grow with block_n), plus the prefetched next step.
# When block_w reaches 32 * num_warps Triton gives the activation loads a layout of their own and converts them
# through shared memory every step; on the H100 some such tiles still measured fastest, so they stay candidates.
# The first entries won most shapes in the last H100 run (see benchmarks/results), so they lead. Entries 9-12 came
# from timing more tiles on a 7B's decode shapes the way decode runs them (graph replays, weights from DRAM): nf4
# takes them on every shape (3-8% faster: 4096x12288 26.5 -> 24.5 us, 11008x4096 25.4 -> 23.5), sym_int4 on some.
# The last five (session 13) are small programs of one or two warps, whose per-step barrier waits on fewer warps.
# On the qkv shape 4096x12288 they beat the best earlier tile by 9% for sym_int4 (14.98 -> 13.65 us) and 2-5% for
# nf4 and sym_int8; on the gated gate/up shape 4096x22016 by 13% for sym_int4 (24.75 -> 21.61 us), 5% for asym_int4
# and 2.5% for sym_int8. They were level or slower on 4096x4096 and 11008x4096. The last, four rows a program
# (session 14), is sym_int8's on the 4096-output shapes: 11008x4096 22.75 -> 20.53 us, 4096x4096 9.77 -> 9.13; the
# 4-bit kinds lost with every 4-row tile tried. The last two (session 16) are wide steps for K that is not a
# multiple of the step, with the partial step read apart (triton_gemv TAIL): on 11008x4096 sym_int4 13.15 -> 12.07
# us (12.31 with every step masked), asym_int4 13.50 -> 12.93, nf4 20.26 -> 19.75 against the best earlier tile.
_GEMV_TILES = ((8, 128, 4, 2, False), (8, 128, 4, 1, False), (16, 64, 4, 2, True), (32, 64, 4, 2, True),
               (16, 128, 8, 2, False), (32, 64, 4, 1, True), (16, 256, 16, 2, False), (8, 64, 4, 2, False),
               (16, 128, 4, 2, False), (8, 128, 2, 2, False), (8, 128, 2, 1, False), (8, 64, 2, 2, False),
               (16, 64, 2, 2, False), (8, 64, 1, 2, False), (32, 64, 2, 2, False), (16, 32, 1, 2, False),
               (8, 128, 1, 2, False), (4, 256, 2, 2, False), (16, 256, 8, 2, False), (8, 256, 4, 2, False))
# The last two fp8 tiles came from a sweep on the H100 (session 8) timed as decode runs them: on 11008x4096 the best
# earlier candidate took 24.2 us (63% of copy), (8, 1024, 4) without prefetch 19.2 us (79%), (8, 512, 8) 20.9 us.
_GEMV_FP8_TILES = ((8, 512, 4, 1, False), (16, 256, 4, 0, False), (32, 128, 8, 1, True), (64, 128, 8, 1, True),
                   (32, 256, 16, 1, False), (16, 256, 4, 1, True), (8, 1024, 4, 0, False), (8, 512, 8, 0, False))


def _step_width(width: int, extent: int, min_width: int) -> int:
    """A tile's K step, no wider than the row (`extent` words or elements, rounded up to a power of two) needs."""
    return min(width, max(min_width, next_power_of_2(extent)))


def _gemv_configs(tiles: tuple, m: int, n: int, extent: int, min_width: int,
                  device: torch.device) -> list[GemvConfig]:
    """GEMV configurations from a tile table, the heuristic choice first (split-K variants for few programs)."""
    out: list[GemvConfig] = []
    for bn, w, warps, prefetch, may_split in tiles:
        w = _step_width(w, extent, min_width)
        out.append(GemvConfig(bn, w, warps, 1, prefetch))
        split = _split_for(m * -(-n // bn), max(1, extent // w), device) if may_split else 1
        if split > 1:
            out.append(GemvConfig(bn, w, warps, split, prefetch))
    return list(dict.fromkeys(out))


def gemv_candidates(m: int, n: int, words: int, device: torch.device) -> list[GemvConfig]:
    """GEMV configurations for a block format (K measured in 32-bit code words per row)."""
    return _gemv_configs(_GEMV_TILES, m, n, words, 16, device)


# Two-plane GEMV tiles (block_n, block_w, num_warps, split_k; nf3 and fp6, no prefetch) beyond _GEMV_TILES, from a
# sweep on the H100 timed as decode runs them (session 33): eight warps on 8x64 took nf3 4096x11008 / 11008x4096
# from 19.15 / 20.68 us (the best earlier candidate) to 18.89 / 19.66, and 8x64 with four warps split three ways
# fp6 11008x4096 from 23.96 to 23.01 (two ways: 23.47); its 512 programs of 8 rows leave few loads in flight.
_GEMV_PLANE_TILES = ((8, 64, 8, 1), (8, 64, 4, 2), (8, 64, 4, 3))


def gemv_plane_candidates(words: int) -> list[GemvConfig]:
    """The two-plane GEMV's configurations beyond gemv_candidates' for rows of `words` low-plane words."""
    return [GemvConfig(bn, _step_width(w, words, 16), warps, split, 0) for bn, w, warps, split in _GEMV_PLANE_TILES]


# Whole-row GEMV tiles (block_n, num_warps): a program's K range is one step, read before the wait (triton_gemv
# WHOLE), 32 or 64 code words a thread. They pay after a latency-bound kernel, so they are timed only there
# (decode_context). H100 (session 21), Llama-2-7B's output projection in the decode graph: (16, 8) took a step
# from 2.0898 to 2.0436 ms, (8, 4) and (16, 4) to 2.08.
_GEMV_WHOLE_TILES = ((16, 8), (8, 4), (32, 16), (16, 4))
_WHOLE_MAX_WORDS = 512  # rows of up to 4096 4-bit codes: longer ones would need over 64 words a thread


def gemv_whole_candidates(words: int) -> list[GemvConfig]:
    """Whole-row GEMV configurations for rows of `words` code words (none past _WHOLE_MAX_WORDS)."""
    if words > _WHOLE_MAX_WORDS:
        return []
    width = _step_width(_WHOLE_MAX_WORDS, words, 16)
    return [GemvConfig(bn, width, warps, 1, 2) for bn, warps in _GEMV_WHOLE_TILES]


# Tiles for GEMV programs that serve 2 or 4 activation rows each (block_m), decoding each code once for all of them.
# H100, timed as decode runs them (session 14): they pay where decoding dominates. nf4 at 2 rows: 4096x12288 38.0 ->
# 26.9 us, gated 4096x22016 67.0 -> 48.1; at 4 rows against the tile matmul 50.0 -> 46.1 and (gated) 87.9 -> 82.8.
# sym_int8 at 4 rows: 4096x12288 43.6 -> 35.8, gated 69.9 -> 61.4. The 4-bit integer kinds decode with one AND a
# code, so each further row costs about as much as the first (sm_90: 3.5 -> 2.8 instructions a code and row) and
# they keep the tile matmul from 4 rows; at 16 rows no multi-row tile came within 3x of it.
_GEMV_MULTIROW_TILES = ((16, 64, 2, 2), (16, 32, 1, 2), (16, 128, 4, 1), (8, 128, 4, 2), (8, 128, 4, 1))
GEMV_MULTIROW_MAX_ROWS = 8


def gemv_multirow_candidates(m: int, words: int) -> list[GemvConfig]:
    """GEMV configurations serving 2 or 4 of `m` (2..GEMV_MULTIROW_MAX_ROWS) activation rows per program."""
    if not 2 <= m <= GEMV_MULTIROW_MAX_ROWS:
        return []
    row_blocks = (2,) if m == 2 else (2, 4)
    return [GemvConfig(bn, _step_width(w, words, 16), warps, 1, prefetch, block_m)
            for bn, w, warps, prefetch in _GEMV_MULTIROW_TILES for block_m in row_blocks]


def gemv_fp8_candidates(m: int, n: int, k: int, device: torch.device) -> list[GemvConfig]:
    """GEMV configurations for fp8 weights (K measured in elements)."""
    return _gemv_configs(_GEMV_FP8_TILES, m, n, k, 32, device)


def matmul_candidates(m: int, n: int, k: int, device: torch.device, pipelined: bool = True) -> list[MatmulConfig]:
    """Tiled-matmul configurations, the heuristic choice first; pipelined=False gives them all one stage.

    One stage is for the two-plane codebooks (nf3, fp6): Triton's software pipelining turns their per-element byte
    and table loads into per-element asynchronous copies through shared memory (H200, 4096x11008 at 4 rows: fp6
    438-569 us pipelined, 71-82 us in one stage).

    A few rows (decode batches) read the weight once for little arithmetic: like the GEMV they are bound by
    bytes in flight, so their tiles are also tried split over K into ~4 programs per SM (on the H100 a
    [16, 64, 64] tile so split ran a 4-row 11008x4096 step in 32 us against 47 us for the best 2-per-SM tile).
    """
    if m <= 16:
        shapes = [(16, 64, 64, 4, 4), (16, 64, 128, 4, 3), (16, 32, 256, 4, 3), (16, 128, 128, 4, 3),
                  (16, 64, 256, 8, 3)]
        loads = (4, 2)
    elif m <= 64:
        shapes = [(64, 64, 128, 4, 3), (32, 64, 128, 4, 3), (64, 128, 64, 4, 3), (64, 128, 128, 8, 3)]
        loads = (2,)
    else:
        shapes = [(128, 128, 64, 8, 3), (128, 64, 128, 4, 3), (64, 128, 128, 4, 3), (128, 256, 64, 8, 3)]
        loads = (2,)
    tiles = [(shape, per_sm) for shape in shapes for per_sm in loads]
    if m <= 16:
        # an H100 sweep at 4 rows (session 8): three stages and up to 8 programs per SM won on the 7B down and
        # gate/up shapes (nf4 11008x4096 48.0 -> 43.3 us, 4096x22016 98.7 -> 91.1; sym_int8 43.4 -> 41.4, 81.1 -> 73.7)
        tiles += [((16, 64, 64, 4, 3), 4), ((16, 64, 64, 4, 3), 8), ((16, 64, 64, 4, 4), 8)]
    out = []
    for (bm, bn, bk, warps, stages), per_sm in tiles:
        split = _split_for(-(-m // bm) * -(-n // bn), max(1, k // bk), device, per_sm)
        out.append(MatmulConfig(bm, bn, bk, warps, stages if pipelined else 1, split))
    if m <= 16:
        # the transposed tile (_tile_dot's SWAP) for 64-row weight tiles, which sm_90 then runs as wgmma: an H100 run
        # at 4 rows (session 12) found sym_int4 8-11% faster (11008x4096 30.8 -> 27.8 us), nf4 1-3%
        out += [replace(c, swap=True) for c in out if c.block_n >= 64]
    return list(dict.fromkeys(out))
