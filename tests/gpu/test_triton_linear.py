"""Triton matmul paths (ipex_llm_tf.kernels.triton_linear) against F.linear on the float32-dequantized weight.

Runs on a CUDA or XPU device and is skipped elsewhere. With TRITON_INTERPRET=1 it also runs on the CPU through the
Triton interpreter (slow; bf16 tl.dot is not emulated there, so bf16 matmul checks are skipped in that mode).

Tolerances are max |y - ref| / max |ref| against the float32 reference: the kernels accumulate in float32, so the
error is the rounding of the output (and, for the tl.dot paths, of the dequantized weight) to the activation dtype.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_INTERPRET, relative_error, triton_device

INTERPRET, DEVICE = TRITON_INTERPRET, triton_device()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs a CUDA or XPU device (or TRITON_INTERPRET=1)")]
triton = pytest.importorskip("triton")

from ipex_llm_tf.formats import get_format, list_formats  # noqa: E402
from ipex_llm_tf.kernels import PackedCache, arrivals, low_bit_linear  # noqa: E402
from ipex_llm_tf.kernels import triton_dequant_matmul as TDM  # noqa: E402
from ipex_llm_tf.kernels import triton_linear as TL  # noqa: E402
from ipex_llm_tf.kernels import triton_tuning  # noqa: E402

TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}
# (out_features N, in_features K): N not a multiple of any block size; K odd multiples of 32 / 64
SHAPES = [(37, 96), (100, 192), (300, 4160)]
ROWS = [1, 3, 16, 64, 200]
FUSED = ["sym_int4", "asym_int4", "sym_int5", "asym_int5", "sym_int8", "nf4", "fp4", "nf3", "fp6", "fp8_e4m3",
         "fp8_e5m2"]


@pytest.fixture(autouse=True, scope="module")
def _no_autotune():
    # tuning compiles every candidate; correctness does not need it (test_configs covers the configurations)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IPEX_LLM_TF_TRITON_AUTOTUNE", "0")
        yield


def _weight(fmt_name: str, n: int, k: int):
    fmt = get_format(fmt_name)
    w = torch.randn(n, k, device=DEVICE) * 0.05
    w[0, :32] = 0.0  # an all-zero block (zero scale)
    parts = fmt.quantize(w)
    return fmt, parts, fmt.dequantize(parts, dtype=torch.float32)


def _check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert y.shape == ref.shape and y.dtype == dtype, f"{what}: {tuple(y.shape)} {y.dtype}"
    assert bool(torch.isfinite(y).all()), f"{what}: non-finite output"
    err = relative_error(y.float(), ref)
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e} over {TOLERANCE[dtype]:.0e}"


def _skip_interpreted_bf16_dot(dtype: torch.dtype, m: int, fmt_name: str) -> bool:
    limit = TL.FUSED_MAX_ROWS_FP8 if fmt_name.startswith("fp8") else TL.FUSED_MAX_ROWS
    return INTERPRET and dtype == torch.bfloat16 and TL.GEMV_MAX_ROWS < m <= limit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fmt_name", list_formats())
def test_linear_matches_reference(fmt_name: str, dtype: torch.dtype) -> None:
    for n, k in SHAPES:
        if k % get_format(fmt_name).block_size:
            continue
        fmt, parts, w_ref = _weight(fmt_name, n, k)
        bias = torch.randn(n, device=DEVICE).to(dtype)
        cache = PackedCache()
        for m in ROWS:
            if _skip_interpreted_bf16_dot(dtype, m, fmt_name):
                continue
            x = torch.randn(m, k, device=DEVICE).to(dtype)
            for b in (bias, None):
                y = TL.linear(x, fmt, parts, b, n, cache)
                ref = F.linear(x.float(), w_ref, None if b is None else b.float())
                _check(y, ref, dtype, f"{fmt_name} N={n} K={k} M={m} bias={b is not None}")


@pytest.mark.parametrize("fmt_name", ["sym_int4", "asym_int5", "sym_int8", "nf4", "fp8_e4m3"])
def test_float32_activations(fmt_name: str) -> None:
    n, k = 100, 192
    fmt, parts, w_ref = _weight(fmt_name, n, k)
    for m in (1, 4, 16, 200):
        x = torch.randn(m, k, device=DEVICE)
        y = TL.linear(x, fmt, parts, None, n, None)
        _check(y, F.linear(x, w_ref), torch.float32, f"{fmt_name} fp32 M={m}")


GEMV_CONFIGS = [TL.GemvConfig(16, 64, 4), TL.GemvConfig(8, 32, 4, 3, 1), TL.GemvConfig(32, 128, 8, 2, 0),
                TL.GemvConfig(64, 16, 4, 5), TL.GemvConfig(16, 256, 16, 1, 1), TL.GemvConfig(8, 128, 4, 1, 2),
                TL.GemvConfig(8, 128, 2, 1, 2),  # two warps, fewer than the step's words: a layout of its own
                TL.GemvConfig(16, 32, 1, 1, 2),  # one warp
                TL.GemvConfig(4, 256, 2, 1, 2),  # four weight rows a program
                # programs serving 4 / 2 activation rows (block formats; the others serve one row per program)
                TL.GemvConfig(8, 32, 4, 3, 1, block_m=4), TL.GemvConfig(16, 64, 2, 1, 2, block_m=2)]
MM_CONFIGS = [TL.MatmulConfig(16, 32, 64, 4, 2, split_k=3), TL.MatmulConfig(64, 64, 128, 4, 3),
              TL.MatmulConfig(32, 64, 256, 4, 2, split_k=2, group_m=2), TL.MatmulConfig(16, 16, 32, 4, 1),
              TL.MatmulConfig(16, 64, 64, 4, 4, split_k=5), TL.MatmulConfig(16, 64, 64, 4, 3, split_k=16),
              TL.MatmulConfig(16, 64, 64, 4, 3, split_k=3, swap=True), TL.MatmulConfig(16, 64, 128, 4, 3, swap=True)]


@pytest.mark.parametrize("fmt_name", FUSED)
def test_configs(fmt_name: str) -> None:
    """Every kernel configuration kind (split-K, K not a multiple of the step, N not of the block) on one shape."""
    n, k = 100, 4160
    fmt, parts, w_ref = _weight(fmt_name, n, k)
    bias = torch.randn(n, device=DEVICE).to(torch.float16)
    fp8 = fmt_name.startswith("fp8")
    ops = TL.fp8_operands(fmt, parts) if fp8 else TL.block_operands(fmt, parts)
    gemv_configs = GEMV_CONFIGS + ([TL.GemvConfig(8, 1024, 4, 1, 0)] if fp8 else [])  # fp8's widest step
    paths = [("gemv", (1, 3, 5), gemv_configs, TL.gemv_fp8 if fp8 else TL.gemv_blocks),
             ("matmul", (16, 40), MM_CONFIGS, TL.matmul_fp8 if fp8 else TL.matmul_blocks)]
    for path, rows, configs, launch in paths:
        for m in rows:
            x = torch.randn(m, k, device=DEVICE).to(torch.float16)
            ref = F.linear(x.float(), w_ref, bias.float())
            for cfg in configs:
                _check(launch(x, ops, bias, n, cfg), ref, torch.float16, f"{fmt_name} {path} {cfg} M={m}")
    dequant_matmul = TL.dequant_matmul_fp8 if fp8 else TL.dequant_matmul_blocks
    _check(dequant_matmul(x, ops, bias, n), ref, torch.float16, f"{fmt_name} dequant+matmul")  # x, ref: M=40


@pytest.mark.parametrize("fmt_name", ["sym_int4", "fp8_e4m3"])
@pytest.mark.parametrize("swap", [False, True])
def test_last_split_sums_the_partials(fmt_name: str, swap: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split-K tile matmul is one launch: each tile's last split to arrive sums the float32 partials in split
    order and writes y, bias included, and leaves its counter at zero (the same bits on a second call). A graph
    capture that finds no counters takes the zeroed float32 output the splits add into, within fp16 rounding."""
    n, k = 100, 640  # the last of 4 K splits shorter; N not a multiple of the tile
    fmt, parts, w_ref = _weight(fmt_name, n, k)
    fp8 = fmt_name.startswith("fp8")
    ops = TL.fp8_operands(fmt, parts) if fp8 else TL.block_operands(fmt, parts)
    launch = TL.matmul_fp8 if fp8 else TL.matmul_blocks
    x = torch.randn(20, k, device=DEVICE).to(torch.float16)
    bias = torch.randn(n, device=DEVICE).to(torch.float16)
    ref = F.linear(x.float(), w_ref, bias.float())
    cfg = TL.MatmulConfig(16, 32, 64, 4, 2, split_k=4, swap=swap)
    assert TL._split_steps(k // 32 if not fp8 else k, 2 if not fp8 else 64, 4)[1] == 4
    _check_last_split_sums(lambda: launch(x, ops, bias, n, cfg), x.device, ref, fmt_name, monkeypatch)


def _check_last_split_sums(call, device: torch.device, ref: torch.Tensor, what: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """call() (a split-K launch) against ref, twice with the same bits and its counters back at zero; then as a
    capture that finds no counters runs it (the splits added into float32 by atomics), within fp16 rounding."""
    first = call()
    counters = TL._SPLIT_ARRIVALS.buffers[device]
    assert first.dtype == torch.float16 and int(counters.abs().sum()) == 0
    _check(first, ref, torch.float16, f"{what} last split sums")
    assert torch.equal(call(), first) and int(counters.abs().sum()) == 0
    monkeypatch.setattr(arrivals, "capturing", lambda device: True)
    monkeypatch.setattr(TL, "_SPLIT_ARRIVALS", arrivals.ArrivalCounters())
    added = call()
    _check(added, ref, torch.float16, f"{what} splits added by atomics")
    torch.testing.assert_close(added, first, rtol=2 ** -9, atol=2 ** -12)


@pytest.mark.parametrize("fmt_name, cfg", [
    ("sym_int4", TL.GemvConfig(8, 16, 4, 4, 2)),
    ("sym_int4", TL.GemvConfig(8, 16, 4, 4, 1, block_m=2)),  # the second program's second row is past M
    ("fp6", TL.GemvConfig(8, 16, 4, 4, 0)),                   # the two-plane kernel
    ("fp8_e4m3", TL.GemvConfig(8, 64, 4, 4, 1)),
])
def test_gemv_last_split_sums_the_partials(fmt_name: str, cfg: TL.GemvConfig,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A split-K GEMV is one launch as well: each output row's last split to arrive, per program column, sums the
    float32 partials in split order and writes y in x's dtype, bias included, and leaves its counter at zero (the
    same bits on a second call). A capture that finds no counters takes the zeroed float32 output instead."""
    n, k = 100, 640
    fmt, parts, w_ref = _weight(fmt_name, n, k)
    fp8 = fmt_name.startswith("fp8")
    ops = TL.fp8_operands(fmt, parts) if fp8 else TL.block_operands(fmt, parts)
    launch = TL.gemv_fp8 if fp8 else TL.gemv_blocks
    assert TL._split_steps(k if fp8 else ops.words_per_row, cfg.block_w, cfg.split_k)[1] > 1
    x = torch.randn(3, k, device=DEVICE).to(torch.float16)
    bias = torch.randn(n, device=DEVICE).to(torch.float16)
    ref = F.linear(x.float(), w_ref, bias.float())
    _check_last_split_sums(lambda: launch(x, ops, bias, n, cfg), x.device, ref, f"{fmt_name} {cfg}", monkeypatch)


@pytest.mark.parametrize("fmt_name", ["sym_int4", "asym_int5", "nf4", "fp8_e4m3"])
def test_dequantize_matmul_in_bands(fmt_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight over DEQUANT_BAND_BYTES is dequantized a band of rows at a time: the same result, bias included."""
    n, k = 300, 192
    fmt, parts, w_ref = _weight(fmt_name, n, k)
    fp8 = fmt_name.startswith("fp8")
    ops = TL.fp8_operands(fmt, parts) if fp8 else TL.block_operands(fmt, parts)
    x = torch.randn(70, k, device=DEVICE).to(torch.float16)
    bias = torch.randn(n, device=DEVICE).to(torch.float16)
    dequant_matmul = TL.dequant_matmul_fp8 if fp8 else TL.dequant_matmul_blocks
    whole = dequant_matmul(x, ops, bias, n)
    monkeypatch.setattr(TDM, "DEQUANT_BAND_BYTES", 64 * k * 2)
    monkeypatch.setattr(TDM, "DEQUANT_BAND_BYTES_PER_ROW", 0)
    assert [rows for _, rows, _ in TDM._bands(ops, n, x)] == [64, 64, 64, 64, 44]
    banded = dequant_matmul(x, ops, bias, n)
    assert torch.equal(banded, whole)
    # the bound grows with the activation rows: 70 rows at 3 * k bytes each make 3 bands, in multiples of 64 rows
    monkeypatch.setattr(TDM, "DEQUANT_BAND_BYTES_PER_ROW", 3 * k)
    assert [rows for _, rows, _ in TDM._bands(ops, n, x)] == [128, 128, 44]
    _check(banded, F.linear(x.float(), w_ref, bias.float()), torch.float16, f"{fmt_name} banded")


@pytest.mark.parametrize("fmt_name", FUSED)
def test_dequantize_kernel_is_exact(fmt_name: str) -> None:
    n, k = 70, 4160
    fmt, parts, w_ref = _weight(fmt_name, n, k)
    fp8 = fmt_name.startswith("fp8")
    ops = TL.fp8_operands(fmt, parts) if fp8 else TL.block_operands(fmt, parts)
    # the interpreter converts to bf16 by truncation, not round-to-nearest-even as the devices do
    for dtype in (torch.float32, torch.float16) + (() if INTERPRET else (torch.bfloat16,)):
        w = TL.dequantize_fp8(ops, n, dtype) if fp8 else TL.dequantize_blocks(ops, n, dtype)
        assert torch.equal(w, w_ref.to(dtype)), f"{fmt_name} {dtype}"


def _fresh_tuning_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """One empty table of tuning choices for the tuner and the planner that reads it, for this test only."""
    tuned: dict = {}
    monkeypatch.setattr(triton_tuning, "_TUNED", tuned)
    monkeypatch.setattr(TL, "_TUNED", tuned)


def test_small_batch_plans_without_autotuning(monkeypatch: pytest.MonkeyPatch) -> None:
    """3..64 rows: the fused matmul, for integer and codebook formats alike; a float32 batch always dequantizes
    (the tile kernels take fp16 / bf16)."""
    # choices another test of this process tuned would be returned first (under xdist, any test may come before)
    _fresh_tuning_table(monkeypatch)
    for fmt_name, m, dtype, launcher in (("sym_int4", 16, torch.float16, TL.matmul_blocks),
                                         ("nf4", 4, torch.float16, TL.matmul_blocks),
                                         ("fp6", 8, torch.float16, TL.matmul_blocks),
                                         ("sym_int8", 5, torch.float32, TL.dequant_matmul_blocks)):
        fmt, parts, _ = _weight(fmt_name, 64, 128)
        (launch, _), final = TL._plan(torch.randn(m, 128, device=DEVICE).to(dtype), TL.block_operands(fmt, parts), 64)
        assert launch is launcher and final, fmt_name


def test_two_plane_tiles_are_not_software_pipelined(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tile matmuls autotuning times for a two-plane codebook have one stage (pipelining turns their byte and
    table loads into per-element async copies); nf4 (table gathered from registers) and integer formats keep theirs."""
    timed: dict[str, set] = {}

    def record(key, options, run, device, operands=None):
        timed[key[1]] = {cfg.num_stages for launch, cfg in options if launch is TL.matmul_blocks}
        return options[0]

    monkeypatch.setattr(TL, "_pick", record)
    for fmt_name in ("nf4", "nf3", "fp6", "sym_int4"):
        fmt, parts, _ = _weight(fmt_name, 64, 128)
        ops = TL.block_operands(fmt, parts)
        TL._plan(torch.randn(4, 128, device=DEVICE).to(torch.float16), ops, 64)
        assert timed[ops.kind] == ({1} if ops.kind in TL.PLANE_KINDS else {3, 4}), fmt_name


def test_decode_autotuning_replays_graphs_on_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    """With autotuning on, a decode row's GEMV is tuned by graph replays over weight replicas (never do_bench), the
    pick is one of the candidates, the replicas are freed afterwards and the planned launch computes the product."""
    if DEVICE != "cuda":
        pytest.skip("graph-replay tuning is CUDA's (XPU and the interpreter keep do_bench or no tuning)")
    import triton.testing
    monkeypatch.setenv("IPEX_LLM_TF_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("IPEX_LLM_TF_TUNING_CACHE", "0")
    _fresh_tuning_table(monkeypatch)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("decode rows used do_bench"))
    n, k = 300, 4160
    fmt, parts, w_ref = _weight("sym_int4", n, k)
    ops = TL.block_operands(fmt, parts)
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    (launch, cfg), final = TL._plan(x, ops, n)
    torch.cuda.synchronize()
    assert final and launch is TL.gemv_blocks and cfg in TL._block_gemv_candidates(1, n, ops, x.device)
    assert torch.cuda.memory_allocated() - before < (1 << 20), "replicas and graph pools are released"
    _check(launch(x, ops, None, n, cfg), F.linear(x.float(), w_ref), torch.float16, "tuned GEMV")
    # batch rows also time dequantize + cuBLAS, which keeps a workspace per stream: tuning must not add one per key
    TL._plan(torch.randn(4, k, device=DEVICE, dtype=torch.float16), ops, n)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    TL._plan(torch.randn(16, k, device=DEVICE, dtype=torch.float16), ops, n)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < (1 << 20), "a second key's tuning kept memory"


def test_dispatch_through_low_bit_linear() -> None:
    """kernels.low_bit_linear sends CUDA/XPU tensors to triton_linear; leading dims and the cache work."""
    if DEVICE == "cpu":
        pytest.skip("dispatch picks the CPU backend for CPU tensors")
    n, k = 100, 192
    fmt, parts, w_ref = _weight("sym_int4", n, k)
    cache = PackedCache()
    x = torch.randn(2, 3, k, device=DEVICE, dtype=torch.float16)
    y = low_bit_linear(x, fmt, parts, None, n, cache)
    _check(y.reshape(6, n), F.linear(x.reshape(6, k).float(), w_ref), torch.float16, "dispatch")
    assert isinstance(cache.value, TL.BlockOperands)


def test_empty_and_strided_input() -> None:
    n, k = 37, 96
    fmt, parts, w_ref = _weight("sym_int8", n, k)
    x = torch.randn(0, k, device=DEVICE, dtype=torch.float16)
    assert TL.linear(x, fmt, parts, None, n, None).shape == (0, n)
    big = torch.randn(4, 2 * k, device=DEVICE, dtype=torch.float16)
    x = big[:, ::2]  # last-dim stride 2
    _check(TL.linear(x, fmt, parts, None, n, None), F.linear(x.float(), w_ref), torch.float16, "strided")


@pytest.mark.parametrize("fmt_name", ["sym_int4", "asym_int4", "sym_int5", "sym_int8", "nf4", "fp4"])
def test_whole_row_gemv(fmt_name: str) -> None:
    """One K step a program (triton_gemv WHOLE: the row read before the wait, nothing prefetched after it), full or
    masked, one row or two, gated or not: the same bits as the tile loading in its loop (no prefetch)."""
    from ipex_llm_tf.kernels.triton_silu_mul import silu_and_mul
    for n, k in ((37, 512), (40, 576)):  # sym_int4: 64 words a row (a full step), 72 (a step of 128, masked)
        fmt, parts, w_ref = _weight(fmt_name, n, k)
        ops = TL.block_operands(fmt, parts)
        width = triton.next_power_of_2(ops.words_per_row)
        bias = torch.randn(n, device=DEVICE).to(torch.float16)
        for rows in (1, 2):
            x = torch.randn(rows, k, device=DEVICE).to(torch.float16)
            ref = F.linear(x.float(), w_ref, bias.float())
            for bn, warps, prefetch in ((8, 4, 2), (16, 8, 1), (4, 2, 2)):
                whole = TL.GemvConfig(bn, width, warps, 1, prefetch)
                looped = TL.GemvConfig(bn, width, warps, 1, 0)
                got = TL.gemv_blocks(x, ops, bias, n, whole)
                _check(got, ref, torch.float16, f"{fmt_name} {whole} M={rows} K={k}")
                assert torch.equal(got, TL.gemv_blocks(x, ops, bias, n, looped)), f"{fmt_name} {whole} M={rows}"
                if n % 2 == 0:
                    gated = TL.gemv_gated(x, ops, None, n, whole)
                    assert torch.equal(gated, silu_and_mul(TL.gemv_blocks(x, ops, None, n, looped)))


@pytest.mark.parametrize("fmt_name", ["sym_int4", "asym_int5", "sym_int8", "nf4", "nf3", "fp6"])
def test_gated_gemv_equals_gemv_then_silu_and_mul(fmt_name: str) -> None:
    """The GEMV's gated epilogue (SiLU(gate) * up of a merged [gate | up] weight, for an MLP's decode rows) rounds
    where the plain GEMV and triton_silu_mul round: bit-identical to them for the same tile, bias included, for an
    odd half width (a partial last program); and the dispatch takes it for decode rows only."""
    from ipex_llm_tf.kernels.triton_silu_mul import silu_and_mul
    half, k = 37, 192
    fmt, parts, _ = _weight(fmt_name, 2 * half, k)
    ops = TL.block_operands(fmt, parts)
    bias = torch.randn(2 * half, device=DEVICE).to(torch.float16)
    for rows in (1, 2, 3):
        x = torch.randn(rows, k, device=DEVICE).to(torch.float16)
        for cfg in (TL.GemvConfig(8, 32, 4, 1, 1), TL.GemvConfig(2, 16, 1, 1, 0), TL.GemvConfig(16, 64, 4, 1, 2),
                    TL.GemvConfig(8, 32, 4, 1, 1, block_m=4), TL.GemvConfig(16, 64, 2, 1, 2, block_m=2)):
            for b in (None, bias):
                want = silu_and_mul(TL.gemv_blocks(x, ops, b, 2 * half, cfg))
                got = TL.gemv_gated(x, ops, b, 2 * half, cfg)
                assert torch.equal(got, want), f"{fmt_name} rows={rows} {cfg} bias={b is not None}"
        if rows <= TL.GEMV_MAX_ROWS:
            assert TL.linear_silu(x, fmt, parts, bias, 2 * half).shape == (rows, half)
    # past GEMV_MAX_ROWS the fused kernel must win autotuning against the plain plan; untuned, the plain plan runs
    x = torch.randn(3, k, device=DEVICE).to(torch.float16)
    assert TL.linear_silu(x, fmt, parts, None, 2 * half) is None
    x = torch.randn(TL.GEMV_MULTIROW_MAX_ROWS + 1, k, device=DEVICE).to(torch.float16)
    assert TL.linear_silu(x, fmt, parts, None, 2 * half) is None


def test_batch_rows_offer_multirow_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """3..8 rows: autotuning also times the multi-row GEMV (block formats but the two-plane ones), for the plain and
    the gated projection; when it picks one, linear and linear_silu run it and compute the product."""
    from ipex_llm_tf.kernels.triton_silu_mul import silu_and_mul
    offered: dict = {}

    def multirow(option) -> bool:
        cfg = option[1] if isinstance(option, tuple) else option  # (launcher, config) or a gated candidate
        return isinstance(cfg, TL.GemvConfig) and cfg.block_m > 1

    def pick_multirow(key, options, run, device, operands=None):
        offered[key] = options
        return next((option for option in options if multirow(option)), options[0])

    monkeypatch.setattr(TL, "_pick", pick_multirow)
    monkeypatch.setattr(TL, "_settled", lambda *a: False)
    for fmt_name in ("nf4", "sym_int8", "fp6"):
        fmt, parts, w_ref = _weight(fmt_name, 64, 128)
        x = torch.randn(5, 128, device=DEVICE).to(torch.float16)
        y = TL.linear(x, fmt, parts, None, 64)
        _check(y, F.linear(x.float(), w_ref), torch.float16, f"{fmt_name} multi-row plan")
        fused = TL.linear_silu(x, fmt, parts, None, 64)
        plane = TL.block_operands(fmt, parts).kind in TL.PLANE_KINDS
        if plane:
            assert fused is None
        else:  # the same tile as the plain plan's: test_gated_gemv_equals_gemv_then_silu_and_mul checks the bits
            assert torch.equal(fused, silu_and_mul(y)), fmt_name
        key = next(k for k in offered if k[0] == "mm" and k[1] == TL.block_operands(fmt, parts).kind)
        assert any(multirow(option) for option in offered[key]) != plane, fmt_name


def _in_place_case(fmt_name: str, n: int, k: int, rows: int, big_every: int):
    """(operands, reference weight, activations) of a weight whose GEMV reads its codes in place on this device
    (skips where the device flushes float32 subnormals): activation row 1 near the fp16 maximum every `big_every`
    inputs (few enough that the outputs stay finite), row 2 fp16 subnormals."""
    fmt, parts, w_ref = _weight(fmt_name, n, k)
    ops = TL.block_operands(fmt, parts)
    assert ops.subnormal == TL.keeps_subnormals(torch.device(DEVICE))
    if not ops.subnormal:
        pytest.skip("the device flushes float32 subnormals")
    x = torch.randn(rows, k, device=DEVICE)
    x[1, ::big_every] = 30000.0
    x[2] = torch.randn(k, device=DEVICE) * 1e-6
    return ops, w_ref, x


@pytest.mark.parametrize("fmt_name", ["sym_int4", "asym_int4", "sym_int8", "fp4"])
def test_subnormal_codes(fmt_name: str) -> None:
    """The GEMV reading codes in place as float32 subnormals (`BlockOperands.subnormal`, set where the device keeps
    them) and the shift-and-OR decoding it replaces both match the reference, for activations from fp16 subnormals
    to near the fp16 maximum and bf16 rows scaled by 2**+-40 (each row checked against its own magnitude)."""
    from dataclasses import replace
    ops, w_ref, x = _in_place_case(fmt_name, 100, 4160, rows=3, big_every=131)
    n = w_ref.shape[0]
    for dtype, scale in ((torch.float16, 1.0), (torch.bfloat16, 2.0 ** 40), (torch.bfloat16, 2.0 ** -40),
                         (torch.float32, 1.0)):
        xd = (x * scale).to(dtype)
        ref = F.linear(xd.double(), w_ref.double())
        for cfg in GEMV_CONFIGS[:3]:
            for subnormal in (False, True):
                y = TL.gemv_blocks(xd, replace(ops, subnormal=subnormal), None, n, cfg)
                for row in range(3):
                    _check(y[row:row + 1], ref[row:row + 1], dtype,
                           f"{fmt_name} {dtype} x{scale:g} row {row} {cfg} subnormal={subnormal}")


@pytest.mark.parametrize("fmt_name", ["fp4", "fp6"])
def test_float_codes_read_in_place_equal_the_table_lookups(fmt_name: str) -> None:
    """fp4's (e2m1) and fp6's (e3m2) GEMV reading their codes in place (SUBNORMAL) gives the table path's bits for
    fp16 and bf16 activations, whose products with the codes are exact and come out scaled by a power of two (float32
    ones round their products, where the compiler may fuse differently: checked against the reference). nf4's and
    nf3's tables are no float format: always lookups."""
    from dataclasses import replace
    n = 40
    assert not any(TL.block_operands(*_weight(name, n, 320)[:2]).subnormal for name in ("nf4", "nf3"))
    ops, w_ref, x = _in_place_case(fmt_name, n, 320, rows=4, big_every=7)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        for cfg in (GEMV_CONFIGS[0], GEMV_CONFIGS[1], GEMV_CONFIGS[-2]):  # plain, split K, four rows a program
            y = TL.gemv_blocks(xd, ops, None, n, cfg)
            table = TL.gemv_blocks(xd, replace(ops, subnormal=False), None, n, cfg)
            assert dtype == torch.float32 or torch.equal(y, table), f"{fmt_name} {dtype} {cfg}"
            _check(y, F.linear(xd.double(), w_ref.double()), dtype, f"{fmt_name} {dtype} {cfg}")
