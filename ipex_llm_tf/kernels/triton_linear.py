"""Triton matmul for LowBitLinear on CUDA and XPU: y = x @ dequantize(W).T + bias, reading the stored layout.

Paths, by format and number of activation rows M:

  * block formats (sym_int4, asym_int4, sym_int5, asym_int5, sym_int8, nf4, fp4, and the two-plane nf3, fp6) and
    fp8 (e4m3, e5m2):
      M <= GEMV_MAX_ROWS  fused dequantize + GEMV (triton_gemv; triton_gemv_planes for nf3 / fp6), one program
                          per (1, 2 or 4 rows, BLOCK_N outputs, K split)
      M <= FUSED_MAX_ROWS fused dequantize-in-tile matmul with tl.dot (triton_matmul), split-K for small M, the
                          last split of a tile to finish summing the partials (one launch: no memset, no cast)
                          (fp16 / bf16 activations; float32 ones take the next path); autotuning also times the
                          next path and, up to 8 rows, the GEMV (multi-row tiles included) against it (see _plan)
      larger M            dequantize once to a temporary in the activation dtype (a Triton kernel) and multiply
                          with torch (cuBLAS / oneDNN), which wins once the matmul is compute-bound
  * fp16 / bf16: torch's own F.linear on the stored weight
  * anything else (formats added later): the format's own dequantize + F.linear

Nothing derived from the weight is kept except views of the stored tensors (triton_operands) and, for the codebook
formats, their value table; the per-layer PackedCache holds that operand bundle so a call does no host-side
preparation. For a merged [gate | up] projection, linear_silu runs the GEMV with SiLU-and-mul in its epilogue.

Launch configurations and their autotuning live in triton_tuning: the first call for each (path, format kind,
M bucket, N, K, dtype) times a few candidates and keeps the fastest for the rest of the process.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..formats import LowBitFormat, Parts
from ..formats.codebooks import CodebookFormat
from ..formats.float8 import Float8Format
from ..formats.plain import PlainFormat
from . import triton_gemv as G
from . import triton_gemv_fp8 as GF
from . import triton_gemv_planes as GP
from . import triton_matmul as MM
from .grids import cdiv
# operands, configs and tuning are also addressed through this module (tests, benchmarks)
from .triton_operands import (PLANE_KINDS, BlockOperands, Fp8Operands, _table,  # noqa: F401
                              block_kind, block_operands, fp8_native, fp8_operands, keeps_subnormals,
                              reads_activation_tile, shuffles_codes)
from .arrivals import ArrivalCounters
# prefill's dequantize + torch matmul (also addressed through this module: tests, benchmarks)
from .triton_dequant_matmul import dequant_matmul_blocks, dequant_matmul_fp8, dequantize_blocks, dequantize_fp8  # noqa: F401
from .lane_lookup import lanes_available
from .launch_overlap import overlap_options
from .triton_silu_mul import silu_and_mul
from .triton_tuning import (_TUNED, GEMV_MULTIROW_MAX_ROWS, GemvConfig, MatmulConfig, _interpreting,  # noqa: F401
                            _pick, _row_bucket, autotune_enabled, gemv_candidates, gemv_fp8_candidates,
                            gemv_multirow_candidates, gemv_plane_candidates, gemv_whole_candidates,
                            matmul_candidates, sm_count, tuned_configs)

# Up to this many activation rows the GEMV kernel runs (once per row, rows sharing weight reads through L2); on
# the H100 it beat the tl.dot matmul at 2 rows and lost from 4 (benchmarks/bench_gpu_linear.py, sym_int4).
GEMV_MAX_ROWS = 2
# Up to this many rows the fused dequantize-in-tile matmul runs; above it a Triton dequantize to a temporary + torch
# matmul. On an H100 (benchmarks/bench_gpu_linear.py, 4096x11008, sym_int4 / sym_int8 / fp8_e4m3) the fused kernel
# won at 64 rows (126 vs 162 us for sym_int4) and lost from 256 (228 vs 155 us).
FUSED_MAX_ROWS = 64
FUSED_MAX_ROWS_FP8 = 64
# Up to this many rows autotuning times candidates as graph decode runs them (weights from memory, no host time).
DECODE_TUNING_ROWS = 16


# ---------------------------------------------------------------------------------------------------------------
# launches
def _finish_split(y32: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y32.add_(bias.to(torch.float32))
    return y32.to(dtype)


def _split_output(x: torch.Tensor, n: int, split: int) -> torch.Tensor:
    """The [M, N] output of a launch: x's dtype, or zeroed float32 for split-K programs to add into."""
    if split == 1:
        return torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
    return torch.zeros((x.shape[0], n), device=x.device, dtype=torch.float32)


def _split_steps(total: int, step: int, split: int) -> tuple[int, int, bool]:
    """(steps per split, splits, even) for `total` units walked `step` at a time in about `split` parts; even means
    every step is full (no masks needed)."""
    steps = -(-total // step)
    per_split = -(-steps // max(1, split))
    splits = -(-steps // per_split)
    return per_split, splits, total == splits * per_split * step


def _tail_step(words: int, cfg: GemvConfig, split: int, even: bool) -> bool:
    """Whether gemv_words_kernel reads a row's partial last step apart (TAIL) rather than masking every step."""
    return not even and split == 1 and cfg.prefetch == 2 and cfg.block_m == 1 and words >= cfg.block_w


def _gemv_words(x: torch.Tensor, ops: BlockOperands, bias: torch.Tensor | None, y: torch.Tensor, outputs: int,
                cfg: GemvConfig, split_k: int, gated: bool, **epilogue: object) -> int:
    """Launch gemv_words_kernel for `outputs` columns of y (gated: SiLU(gate) * up; epilogue: the folded-norm
    arguments, triton_folded_norm); returns the K splits used."""
    kw = ops.words_per_row
    per_split, split, even = _split_steps(kw, cfg.block_w, split_k)
    per_program = cfg.block_n // 2 if gated else cfg.block_n  # a gated program covers gate and up rows
    lanes = shuffles_codes(ops.kind, ops.subnormal) and lanes_available(x.device)
    # the lanes hold the plain table's values (nf3's table loads read its pair table)
    table = ops.table if lanes else ops.gemv_table
    if ops.kind in PLANE_KINDS:
        kernel, options, block_m = GP.gemv_planes_kernel, {
            "SUBNORMAL": ops.subnormal, "LANES": lanes,
            "X_TILE": reads_activation_tile(ops.kind, ops.subnormal, lanes)}, 1
    else:
        block_m = cfg.block_m
        kernel, options = G.gemv_words_kernel, {"SUBNORMAL": ops.subnormal, "BLOCK_M": block_m, "LANES": lanes,
                                                 "X_TILE": lanes, **overlap_options(x.device)}
        if _tail_step(kw, cfg, split, even):  # full steps unmasked, the partial one read first
            per_split, even, options["TAIL"] = kw // cfg.block_w, True, True
        elif per_split == 1 and cfg.prefetch > 0:  # one step a program: read before the wait, nothing after
            options["WHOLE"] = True
    kernel[(cdiv(x.shape[0], block_m), cdiv(outputs, per_program), split)](
        x, ops.words, ops.scales, ops.mins, ops.qh, table, ops.scales if bias is None else bias, y,
        x.shape[0], outputs, kw, x.stride(0), y.stride(0), per_split, G.ONE_BITS,
        KIND=ops.kind, SCALE_SHIFT=ops.scale_shift_blocks, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w,
        SPLIT_K=split, HAS_BIAS=_bias_in_kernel(bias, split, bool(epilogue.get("LAST_SUMS"))), EVEN=even,
        PREFETCH=cfg.prefetch, GATED=gated, num_warps=cfg.num_warps, enable_fp_fusion=True, **options, **epilogue)
    return split


def _bias_in_kernel(bias: torch.Tensor | None, split: int, last_sums: bool) -> bool:
    """Whether a launch adds the bias itself: it does where it writes y in one pass (one split, or the last split
    summing the partials); splits adding atomically leave it to _finish_split."""
    return bias is not None and (split == 1 or last_sums)


def _gemv_outputs(x: torch.Tensor, n: int, split: int, columns: int) -> tuple[torch.Tensor, dict]:
    """(y, the kernel's split-K arguments) of a GEMV launch with `split` K splits and `columns` programs per row:
    with arrival counters, y in x's dtype that the last split of each program column writes (LAST_SUMS: one launch
    and no memset); else _split_output's y and no arguments."""
    y, part, arrived, last_sums = _tile_outputs(x, n, split, x.shape[0] * columns)
    return y, ({"part_ptr": part, "arrived_ptr": arrived, "LAST_SUMS": True} if last_sums else {})


def gemv_blocks(x: torch.Tensor, ops: BlockOperands, bias: torch.Tensor | None, n: int,
                cfg: GemvConfig) -> torch.Tensor:
    """Fused dequantize + GEMV of a block format for the (few) rows of x."""
    _, split, _ = _split_steps(ops.words_per_row, cfg.block_w, cfg.split_k)
    y, sums = _gemv_outputs(x, n, split, cdiv(n, cfg.block_n))
    _gemv_words(x, ops, bias, y, n, cfg, cfg.split_k, gated=False, **sums)
    return y if split == 1 or sums else _finish_split(y, bias, x.dtype)


def gemv_gated(x: torch.Tensor, ops: BlockOperands, bias: torch.Tensor | None, n: int,
               cfg: GemvConfig) -> torch.Tensor:
    """SiLU(gate) * up [M, n / 2] of a merged [gate | up] weight of n rows, by the GEMV with its gated epilogue."""
    y = torch.empty((x.shape[0], n // 2), device=x.device, dtype=x.dtype)
    _gemv_words(x, ops, bias, y, n // 2, cfg, 1, gated=True)
    return y


def gemv_fp8(x: torch.Tensor, ops: Fp8Operands, bias: torch.Tensor | None, n: int, cfg: GemvConfig) -> torch.Tensor:
    m, k = x.shape
    per_split, split, even = _split_steps(k, cfg.block_w, cfg.split_k)
    y, sums = _gemv_outputs(x, n, split, cdiv(n, cfg.block_n))
    GF.gemv_fp8_kernel[(m, cdiv(n, cfg.block_n), split)](
        x, ops.qweight, ops.scales, ops.scales if bias is None else bias, y,
        m, n, k, x.stride(0), y.stride(0), per_split,
        E5M2=ops.e5m2, NATIVE=ops.native, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_w, SPLIT_K=split,
        HAS_BIAS=_bias_in_kernel(bias, split, bool(sums)), EVEN=even, PREFETCH=cfg.prefetch,
        num_warps=cfg.num_warps, enable_fp_fusion=True, **overlap_options(x.device), **sums)
    return y if split == 1 or sums else _finish_split(y, bias, x.dtype)


# the K splits of a tile matmul or GEMV meet here: the last split of a tile to arrive sums the partials (one launch,
# no memset)
_SPLIT_ARRIVALS = ArrivalCounters()


def _tile_outputs(x: torch.Tensor, n: int, split: int,
                  tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(y, partials, arrival counters, last_sums) of a split-K launch (a tile matmul's, or a GEMV's) with `split` K
    splits over `tiles` tiles (or GEMV program columns and rows).

    last_sums: the splits store float32 partials [split, M, N] and a tile's last split writes y (x's dtype) from
    them. Otherwise (one split, or a graph capture that finds no counters large enough) y is the launch's output:
    x's dtype, or zeroed float32 that the splits add into (_finish_split then casts)."""
    if split > 1:
        arrived = _SPLIT_ARRIVALS.get(x.device, tiles)
        if arrived is not None:
            y = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
            part = torch.empty((split, x.shape[0], n), device=x.device, dtype=torch.float32)
            return y, part, arrived, True
    y = _split_output(x, n, split)
    return y, y, y, False


def matmul_blocks(x: torch.Tensor, ops: BlockOperands, bias: torch.Tensor | None, n: int,
                  cfg: MatmulConfig) -> torch.Tensor:
    """Fused dequantize-in-tile matmul of a block format (x fp16 or bf16)."""
    m = x.shape[0]
    kb = ops.blocks_per_row
    nb = max(1, cfg.block_k // 32)
    per_split, split, even = _split_steps(kb, nb, cfg.split_k)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    y, part, arrived, last_sums = _tile_outputs(x, n, split, tiles)
    MM.matmul_blocks_kernel[(tiles, split)](
        x, ops.codes, ops.scales, ops.mins, ops.qh, ops.table, ops.scales if bias is None else bias, y, part, arrived,
        m, n, kb, x.stride(0), y.stride(0), per_split,
        KIND=ops.kind, SBLK_SHIFT=ops.scale_shift_blocks, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NB=nb,
        GROUP_M=cfg.group_m, SPLIT_K=split, HAS_BIAS=_bias_in_kernel(bias, split, last_sums), EVEN=even,
        SWAP=cfg.swap, LAST_SUMS=last_sums, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True,
        **overlap_options(x.device))
    return y if split == 1 or last_sums else _finish_split(y, bias, x.dtype)


def matmul_fp8(x: torch.Tensor, ops: Fp8Operands, bias: torch.Tensor | None, n: int,
               cfg: MatmulConfig) -> torch.Tensor:
    m, k = x.shape
    per_split, split, even = _split_steps(k, cfg.block_k, cfg.split_k)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    y, part, arrived, last_sums = _tile_outputs(x, n, split, tiles)
    MM.matmul_fp8_kernel[(tiles, split)](
        x, ops.qweight, ops.scales, ops.scales if bias is None else bias, y, part, arrived,
        m, n, k, x.stride(0), y.stride(0), per_split,
        E5M2=ops.e5m2, NATIVE=ops.native, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, SPLIT_K=split, HAS_BIAS=_bias_in_kernel(bias, split, last_sums), EVEN=even,
        SWAP=cfg.swap, LAST_SUMS=last_sums, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True,
        **overlap_options(x.device))
    return y if split == 1 or last_sums else _finish_split(y, bias, x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# dispatch
def _operands(fmt: LowBitFormat, parts: Parts, cache) -> BlockOperands | Fp8Operands | None:
    if block_kind(fmt) is not None:
        build = lambda: block_operands(fmt, parts)  # noqa: E731
    elif isinstance(fmt, Float8Format):
        build = lambda: fp8_operands(fmt, parts)  # noqa: E731
    else:
        return None
    return cache.get(parts, build) if cache is not None else build()


def _codebook_dequantize(fmt: CodebookFormat, parts: Parts, dtype: torch.dtype) -> torch.Tensor:
    """fmt.dequantize for device tensors without host-to-device copies (so it can run inside CUDA graph capture)."""
    codes = fmt.codes(parts)
    n, k = codes.shape
    values = _table(fmt, codes.device)[codes.long()].reshape(n, k // fmt.block_size, fmt.block_size)
    return (values * parts["scales"].to(torch.float32).unsqueeze(-1)).reshape(n, k).to(dtype)


def _block_gemv_candidates(m: int, n: int, ops: BlockOperands, device: torch.device) -> list[GemvConfig]:
    """gemv_candidates for this weight, and for 2 rows the multi-row tiles; the two-plane GEMV has no prefetch (it
    measured slower), so one per tile, serves one row per program, and has tiles of its own."""
    cands = gemv_candidates(m, n, ops.words_per_row, device)
    if ops.kind in PLANE_KINDS:
        return list(dict.fromkeys([replace(c, prefetch=0) for c in cands] +
                                  gemv_plane_candidates(ops.words_per_row)))
    return cands + (gemv_multirow_candidates(m, ops.words_per_row) if m == 2 else [])


def _plan(x: torch.Tensor, ops: BlockOperands | Fp8Operands, n: int, context=None):
    """(launcher, config) for these activations: GEMV, fused matmul or dequantize + matmul; (plan, final).

    Between GEMV_MAX_ROWS and the fused matmul's limit, autotuning times the fused matmul, dequantize + torch's
    matmul and (up to 8 rows) the GEMV, one row or several per program, as any of them can win there. The
    two-plane codebooks' tiles run unpipelined (matmul_candidates); with that, and nf4's table lookups as register
    gathers (triton_matmul), every format's tile beats dequantize + matmul at 4 and 16 rows (H200, 4096x11008: nf4
    49 vs 94 us, nf3 66 vs 105, fp6 71 vs 107), so the fused matmul is every format's choice without autotuning.

    context (the layer's PackedCache.decode_context): the kernel that produces x in a decode step. A block-format
    GEMV so placed also gets whole-row tiles as candidates, and every candidate is timed right after that kernel.
    """
    m, k = x.shape
    timed_after = None  # the decode context whose kernel produces the GEMV's input when candidates are timed
    device = x.device
    fp8 = isinstance(ops, Fp8Operands)
    kind = "fp8" if fp8 else ops.kind
    if m <= GEMV_MAX_ROWS:
        if fp8:
            options = [(gemv_fp8, c) for c in gemv_fp8_candidates(m, n, k, device)]
        else:
            options = [(gemv_blocks, c) for c in _block_gemv_candidates(m, n, ops, device)]
        key = ("gemv", kind, m, n, k, x.dtype)
        whole = [] if context is None or fp8 or ops.kind in PLANE_KINDS else gemv_whole_candidates(ops.words_per_row)
        if whole:
            options += [(gemv_blocks, c) for c in whole]
            key += (context.tag,)
            timed_after = context
    elif m <= (FUSED_MAX_ROWS_FP8 if fp8 else FUSED_MAX_ROWS) and x.dtype in (torch.float16, torch.bfloat16):
        dequant = (dequant_matmul_fp8 if fp8 else dequant_matmul_blocks, None)
        cands = matmul_candidates(m, n, k, device, pipelined=kind not in PLANE_KINDS)
        options = [(matmul_fp8 if fp8 else matmul_blocks, c) for c in cands] + [dequant]
        if m <= 8:
            gemv = (gemv_fp8, gemv_fp8_candidates(m, n, k, device)[0]) if fp8 else \
                (gemv_blocks, _block_gemv_candidates(m, n, ops, device)[0])
            options.append(gemv)
        if not fp8 and kind not in PLANE_KINDS:
            options += [(gemv_blocks, c) for c in gemv_multirow_candidates(m, ops.words_per_row)]
        key = ("mm", kind, _row_bucket(m), n, k, x.dtype)
    else:
        return (dequant_matmul_fp8 if fp8 else dequant_matmul_blocks, None), True
    made: list = []  # the context's input call, made when a first candidate is timed (not for a stored choice)

    def run(option, replica=ops):
        launch, cfg = option
        if timed_after is not None and not made:
            made.append(timed_after.input_maker(m, x.dtype, device))
        x_in = x if timed_after is None else made[0]()
        return launch(x_in, replica, None, n) if cfg is None else launch(x_in, replica, None, n, cfg)

    # decode rows (up to a batch of 16) are timed as graph decode runs them (triton_tuning._pick)
    plan = _pick(key, options, run, device, operands=ops if m <= DECODE_TUNING_ROWS else None)
    return plan, _settled(key, options, device)


def _settled(key: tuple, options: list, device: torch.device) -> bool:
    """Whether the choice _pick made for `key` is final (tuned, or nothing to tune), so a layer may keep it."""
    return key in _TUNED or len(options) == 1 or not autotune_enabled(device)


def plan_key(rows: int, dtype: torch.dtype) -> tuple:
    """Where linear keeps its settled plan for `rows` activation rows of `dtype` in the operands' `plans`."""
    return (rows if rows <= FUSED_MAX_ROWS_FP8 else -1, dtype)


def gated_plan_key(rows: int, dtype: torch.dtype) -> tuple:
    """Where linear_silu keeps its settled choice (a GEMV tile or UNFUSED) for `rows` rows of `dtype`."""
    return ("gated", rows, dtype)


def linear(x2d: torch.Tensor, fmt: LowBitFormat, parts: Parts, bias: torch.Tensor | None, out_features: int,
           cache=None) -> torch.Tensor:
    """y [M, N] = x2d [M, K] @ dequantize(parts).T + bias, in x2d's dtype."""
    n = out_features
    b = None if bias is None else bias.to(x2d.dtype)
    if isinstance(fmt, PlainFormat):
        return F.linear(x2d, parts["weight"].to(x2d.dtype), b)
    ops = _operands(fmt, parts, cache)
    if ops is None:
        if isinstance(fmt, CodebookFormat):
            return F.linear(x2d, _codebook_dequantize(fmt, parts, x2d.dtype), b)
        return F.linear(x2d, fmt.dequantize(parts, dtype=x2d.dtype), b)
    x = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    m = x.shape[0]
    if m == 0:
        return x.new_zeros((0, n))
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    key = plan_key(m, x.dtype)
    plan = ops.plans.get(key)
    if plan is None:
        plan, final = _plan(x, ops, n, getattr(cache, "decode_context", None))
        if final:
            ops.plans[key] = plan
    launch, cfg = plan
    if cfg is None:
        return launch(x, ops, bias, n)
    return launch(x, ops, bias, n, cfg)


UNFUSED = "unfused"  # linear_silu's tuning choice of the plain plan followed by silu_and_mul


def _gated_candidates(m: int, n: int, ops: BlockOperands, device: torch.device) -> list:
    """What linear_silu may run for m rows: GEMV tiles that keep whole row pairs in a program and do not split K;
    past GEMV_MAX_ROWS the multi-row ones, after UNFUSED (the plan for the rows, then silu_and_mul)."""
    if m <= GEMV_MAX_ROWS:
        tiles = _block_gemv_candidates(m, n, ops, device)
    elif ops.kind in PLANE_KINDS:
        return [UNFUSED]
    else:
        tiles = [UNFUSED] + gemv_multirow_candidates(m, ops.words_per_row)
    return [c for c in tiles if c == UNFUSED or (c.split_k == 1 and c.block_n % 2 == 0)]


def linear_silu(x2d: torch.Tensor, fmt: LowBitFormat, parts: Parts, bias: torch.Tensor | None, out_features: int,
                cache=None) -> torch.Tensor | None:
    """SiLU(gate) * up [M, out_features / 2] of a merged [gate | up] projection in one GEMV launch (decode rows of a
    block format, where autotuning found it faster); None where that kernel does not apply or lost, for the caller
    to run linear then silu_and_mul."""
    ops = _operands(fmt, parts, cache)
    x = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    m = x.shape[0]
    if not isinstance(ops, BlockOperands) or not 0 < m <= GEMV_MULTIROW_MAX_ROWS or out_features % 2:
        return None
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    key = gated_plan_key(m, x.dtype)
    cfg = ops.plans.get(key)
    if cfg is None:
        candidates = _gated_candidates(m, out_features, ops, x.device)
        # the unfused plan is tuned first, so that timing UNFUSED below does not tune inside the timing
        timed_unfused = len(candidates) > 1 and candidates[0] == UNFUSED
        launch, plan_cfg = _plan(x, ops, out_features)[0] if timed_unfused else (None, None)

        def run(choice, replica=ops):
            if choice != UNFUSED:
                return gemv_gated(x, replica, None, out_features, choice)
            y = launch(x, replica, None, out_features) if plan_cfg is None else \
                launch(x, replica, None, out_features, plan_cfg)
            return silu_and_mul(y)

        tune_key = ("gemv-gated", ops.kind, m, out_features, ops.in_features, x.dtype)
        cfg = _pick(tune_key, candidates, run, x.device, operands=ops)
        if _settled(tune_key, candidates, x.device):
            ops.plans[key] = cfg
    return None if cfg == UNFUSED else gemv_gated(x, ops, bias, out_features, cfg)
