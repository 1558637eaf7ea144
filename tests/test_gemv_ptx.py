"""What the decode GEMV compiles to for an sm_90 target (PTX from Triton on the host, never run; no GPU needed).

The kinds whose codes are read in place (triton_gemv, SUBNORMAL: the 4- and 8-bit integers, and fp4's e2m1 through
the 16-entry codebook kind) must neither gather from a table nor convert their tiles between layouts: a per-code
gather gets a layout of its own from Triton's coalescing pass, and each code's tile then goes through shared memory
(nf4's table path: 256 shared-memory accesses of 64-bit pointers in the 128x16 tile's loop).
"""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

from ipex_llm_tf.kernels import triton_gemv as G  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv_planes as GP  # noqa: E402
from ipex_llm_tf.kernels.sm90_ptx import GEMV_POINTERS, loop_body, opcode, ptx_lines  # noqa: E402

TILES = [(16, 64), (16, 128), (8, 128)]  # (BLOCK_N, BLOCK_W) of the H100's tuned decode tiles
TRITON_VERSION = tuple(int(part) for part in __import__("triton").__version__.split(".")[:2])
# the tile sums' reductions and the scale and min tiles' conversions: 6-35 shared-memory accesses in these tiles
SHARED_LIMIT = 48


def _lines(kind: int, block_n: int, block_w: int, subnormal: bool, lanes: bool = False,
           x_tile: bool = False) -> list[str]:
    consts = dict(KIND=kind, SCALE_SHIFT=0, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=1, HAS_BIAS=False, EVEN=True,
                  PREFETCH=2, GATED=False, SUBNORMAL=subnormal, BLOCK_M=1, OVERLAP=False, TAIL=False, LANES=lanes,
                  X_TILE=x_tile)
    return [line.strip() for line in ptx_lines(G.gemv_words_kernel, GEMV_POINTERS, consts)]


def _loads(kind: int, block_n: int, block_w: int, subnormal: bool, lanes: bool = False) -> list[str]:
    return [line for line in _lines(kind, block_n, block_w, subnormal, lanes) if ".global." in line or ".shared." in line]


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("kind", ["Q4_SYM", "Q4_ASYM", "Q8_SYM", "CB4"])
def test_in_place_codes_gather_nothing_and_keep_one_layout(kind: str, tile: tuple[int, int]) -> None:
    accesses = _loads(getattr(G, kind).value, *tile, subnormal=True)
    gathers = [a for a in accesses if "ld.global.b32" in a]  # one 4-byte load a code: a table or a per-word gather
    shared = [a for a in accesses if ".shared." in a]
    assert not gathers, f"{kind} {tile}: {len(gathers)} scalar 4-byte loads"
    assert len(shared) <= SHARED_LIMIT, f"{kind} {tile}: {len(shared)} shared-memory accesses"


def test_table_path_is_what_the_check_catches() -> None:
    """The same counts on nf4's table path (CB4 without SUBNORMAL) fail the checks, so they can fail: its gathers
    with every Triton; its trips through shared memory with 3.9 (the H100s' 3.6 keeps that tile in one layout, 21
    accesses, so there the gathers alone give it away)."""
    accesses = _loads(G.CB4.value, 16, 128, subnormal=False)
    assert sum("ld.global.b32" in a for a in accesses) == 8 * 16  # 8 codes a word, 16 of the tile's words a thread
    if TRITON_VERSION >= (3, 7):
        assert sum(".shared." in a for a in accesses) > 4 * SHARED_LIMIT


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_lane_lookups_shuffle_every_code_and_load_no_table(tile: tuple[int, int]) -> None:
    """nf4 with LANES (kernels/lane_lookup): one 16-lane-segment shuffle per code of a thread's words, no per-code
    table loads, and no per-code trips through shared memory."""
    block_n, block_w = tile
    lines = _lines(G.CB4.value, block_n, block_w, subnormal=False, lanes=True)
    shuffles = [line for line in lines if line.startswith("shfl.sync.idx.b32") and "0x101f" in line]
    words_a_thread = block_n * block_w // (32 * 4)  # every tile here runs four warps
    assert len(shuffles) >= 8 * words_a_thread
    accesses = [line for line in lines if ".global." in line or ".shared." in line]
    assert sum("ld.global.b32" in a for a in accesses) <= 1  # the lane's own table entry, once
    assert sum(".shared." in a for a in accesses) <= SHARED_LIMIT


@pytest.mark.parametrize("tile", [(8, 128)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_activation_tile_takes_the_barriers_out_of_the_loop(tile: tuple[int, int]) -> None:
    """nf4 with LANES reads a step's activations as one tile (X_TILE): a few barriers in the K loop, where the
    eight vector loads, each converted to the codes' layout through shared memory, put three times as many (4
    against 18 with Triton 3.9, 2 against 16 with 3.6, in this four-warp tile). Not every tile gains: 16x128 at
    four warps has 4 against 18 with 3.9 but 20 against 16 with 3.6, and tiles whose vectors Triton lays out as
    the codes need (16x64 at four warps, 32x64, 16x128 at eight) keep 1-2 barriers without the tile and 2-4 with
    it; the tuner times both kinds."""
    counts = {x_tile: sum(line.startswith("bar.sync") for line in
                          loop_body(_lines(G.CB4.value, *tile, subnormal=False, lanes=True, x_tile=x_tile)))
              for x_tile in (True, False)}
    assert counts[True] <= 6 and counts[False] >= 3 * counts[True], f"{tile}: barriers {counts}"


@pytest.mark.parametrize("tile", [(16, 128, 4), (16, 256, 8)], ids=lambda t: f"{t[0]}x{t[1]}x{t[2]}")
def test_nf3_activation_tile_takes_the_barriers_out_of_the_loop(tile: tuple[int, int, int]) -> None:
    """nf3's two-plane GEMV with LANES and X_TILE: its sixteen activation vectors a step from one tile, so a third of
    the barriers in the K loop or fewer (42 -> 12 with Triton 3.9 and 42 -> 14 with 3.6 in both tiles). Not every
    tile gains: 8x128 at four warps goes 38 -> 8 with 3.9 but 38 -> 50 with 3.6, and 16x64 at four warps or 8x64 at
    eight get the vectors' layout from Triton as they are (6 and 0 barriers without the tile, 8 and 2 with it)."""
    counts = {}
    for x_tile in (True, False):
        consts = dict(KIND=G.CB3.value, SCALE_SHIFT=1, BLOCK_N=tile[0], BLOCK_W=tile[1], SPLIT_K=1, HAS_BIAS=False,
                      EVEN=True, PREFETCH=0, GATED=False, SUBNORMAL=False, LANES=True, X_TILE=x_tile)
        body = loop_body(ptx_lines(GP.gemv_planes_kernel, GEMV_POINTERS, consts, num_warps=tile[2]))
        counts[x_tile] = sum(line.strip().startswith("bar.sync") for line in body)
    assert 3 * counts[True] <= counts[False], f"{tile}: barriers {counts}"


@pytest.mark.parametrize("tile", [(16, 64, 2), (8, 128, 4)], ids=lambda t: f"{t[0]}x{t[1]}x{t[2]}")
def test_fp6_activation_tile_takes_shared_memory_out_of_the_loop(tile: tuple[int, int, int]) -> None:
    """fp6 read in place with X_TILE: its eight activation vectors a step from one tile, so fewer shared-memory
    instructions in the K loop (48 -> 42 and 36 -> 30 with Triton 3.9; 92 -> 44 and 84 -> 21 with the H100s' 3.6),
    and in the 8x128 tile at four warps fewer barriers too (22 -> 8 with both)."""
    counts = {}
    for x_tile in (True, False):
        consts = dict(KIND=G.CB6.value, SCALE_SHIFT=0, BLOCK_N=tile[0], BLOCK_W=tile[1], SPLIT_K=1, HAS_BIAS=False,
                      EVEN=True, PREFETCH=0, GATED=False, SUBNORMAL=True, LANES=False, X_TILE=x_tile)
        body = loop_body(ptx_lines(GP.gemv_planes_kernel, GEMV_POINTERS, consts, num_warps=tile[2]))
        counts[x_tile] = (sum(line.strip().startswith("bar.sync") for line in body),
                          sum(".shared." in line for line in body))
    assert counts[True][1] < counts[False][1], f"{tile}: (barriers, shared) {counts}"
    if tile[0] == 8:
        assert 2 * counts[True][0] <= counts[False][0], f"{tile}: (barriers, shared) {counts}"


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_nf3_lane_lookups_shuffle_every_code_and_load_no_pairs(tile: tuple[int, int]) -> None:
    """nf3's two-plane GEMV with LANES: one 8-lane-segment shuffle per code (16 a low-plane word) and no pair-table
    loads (8-byte scalar loads), where the table path has one a pair of codes."""
    block_n, block_w = tile

    def lines(lanes: bool) -> list[str]:
        consts = dict(KIND=G.CB3.value, SCALE_SHIFT=1, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=1, HAS_BIAS=False,
                      EVEN=True, PREFETCH=0, GATED=False, SUBNORMAL=False, LANES=lanes)
        pointers = GEMV_POINTERS if lanes else {**GEMV_POINTERS, "tab_ptr": "*i64"}
        return [line.strip() for line in ptx_lines(GP.gemv_planes_kernel, pointers, consts)]
    shuffled, paired = lines(True), lines(False)
    words_a_thread = block_n * block_w // (32 * 4)
    assert sum(line.startswith("shfl.sync.idx.b32") and "0x181f" in line for line in shuffled) == 16 * words_a_thread
    assert not any("ld.global.b64" in line for line in shuffled)
    assert sum("ld.global.b64" in line for line in paired) == 8 * words_a_thread


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("kind", ["Q5_SYM", "Q5_ASYM", "CB3", "CB6"])
def test_split_codes_join_once_a_word(kind: str, tile: tuple[int, int]) -> None:
    """Codes split over two loads (5-bit codes and their 5th bits; nf3 / fp6's two planes) are joined once a word
    (triton_gemv.merge_fifth_bits, triton_gemv_planes.merge_planes) as CUDA runs them (nf3 shuffled, fp6 in place):
    their loads get different layouts, and joining them a code at a time converted every code's tile through shared
    memory (main before session 28: 140-596 shared-memory accesses in these tiles, now 16-131 with Triton 3.9 and
    up to 169, nf3's 16x128, with the H100s' 3.6). What is left grows with the step's activations (block_w), not
    with its codes."""
    block_n, block_w = tile
    consts = dict(KIND=getattr(G, kind).value, SCALE_SHIFT=1 if kind == "CB3" else 0, BLOCK_N=block_n,
                  BLOCK_W=block_w, SPLIT_K=1, HAS_BIAS=False, EVEN=True, GATED=False, LANES=kind == "CB3",
                  SUBNORMAL=kind == "CB6")
    if kind.startswith("Q5"):
        kernel = G.gemv_words_kernel
        consts.update(PREFETCH=2, BLOCK_M=1, OVERLAP=False, TAIL=False)
    else:
        kernel = GP.gemv_planes_kernel
        consts.update(PREFETCH=0)
    lines = [line.strip() for line in ptx_lines(kernel, GEMV_POINTERS, consts)]
    shared = sum(".shared." in line for line in lines)
    assert shared <= block_w + 48, f"{kind} {tile}: {shared} shared-memory accesses"


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_fp4_codes_in_place_take_three_integer_instructions(tile: tuple[int, int]) -> None:
    """fp4's e2m1 codes read in place (CB4 with SUBNORMAL): a shift up, an arithmetic shift down and one mask a code,
    no OR joining a sign to a magnitude (four a code before session 30: for the 128 codes a thread of the 16x64 tile
    at two warps 210 shifts, 257 ANDs and 129 ORs, now 214 shifts, 129 ANDs and no OR)."""
    block_n, block_w = tile
    body = loop_body(_lines(G.CB4.value, block_n, block_w, subnormal=True))
    codes = block_n * block_w * 8 // (32 * 4)  # four warps
    ops = [opcode(line) for line in body]
    integer = sum(op in ("shl.b32", "shr.s32", "shr.u32", "and.b32", "or.b32") for op in ops)
    assert integer <= 3 * codes + 8, f"{tile}: {integer} integer instructions for {codes} codes"
    assert ops.count("or.b32") <= 2, f"{tile}: {ops.count('or.b32')} ORs"


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_fp6_codes_in_place_need_no_or_a_code(tile: tuple[int, int]) -> None:
    """fp6's e3m2 codes read in place (the two-plane GEMV with SUBNORMAL) as fp4's are: an OR is left only where
    merge_planes joins a word's planes (16 in the 16x64 tile at four warps, 64 codes a thread; 80 before session
    30, one a code more)."""
    block_n, block_w = tile
    consts = dict(KIND=G.CB6.value, SCALE_SHIFT=0, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=1, HAS_BIAS=False,
                  EVEN=True, PREFETCH=0, GATED=False, SUBNORMAL=True, LANES=False)
    body = [line.strip() for line in loop_body(ptx_lines(GP.gemv_planes_kernel, GEMV_POINTERS, consts))]
    codes = block_n * block_w * 8 // (32 * 4)  # eight fp6 codes a low-plane word (its 4-bit parts), four warps
    ors = sum(line.startswith("or.b32") for line in body)
    assert ors <= codes // 4 + 2, f"{tile}: {ors} ORs for {codes} codes"


@pytest.mark.parametrize("kernel", ["words", "planes"])
def test_split_k_sums_in_the_last_split_without_float_atomics(kernel: str) -> None:
    """LAST_SUMS: the K splits store partials and count their arrival (one acq_rel integer add, one exchange to zero
    the counter) and add no float atomically; without it they add their sums into a float32 y atomically."""
    consts = dict(SCALE_SHIFT=0, BLOCK_N=8, BLOCK_W=64, SPLIT_K=3, HAS_BIAS=True, EVEN=True, GATED=False,
                  SUBNORMAL=True)
    if kernel == "words":
        jit, consts = G.gemv_words_kernel, dict(consts, KIND=G.Q4_SYM.value, PREFETCH=2, BLOCK_M=1)
    else:
        jit, consts = GP.gemv_planes_kernel, dict(consts, KIND=G.CB6.value, PREFETCH=0, X_TILE=True)

    def global_atomics(last_sums: bool) -> list[str]:
        pointers = dict(GEMV_POINTERS, part_ptr="*fp32", arrived_ptr="*i32", y_ptr="*fp16" if last_sums else "*fp32")
        lines = ptx_lines(jit, pointers, dict(consts, LAST_SUMS=last_sums))
        return [opcode(line.strip()) for line in lines if "atom.global" in line or "red.global" in line]

    summed = global_atomics(True)
    assert any(op.startswith("atom.global") and op.endswith(".acq_rel.add.u32") for op in summed), summed
    assert any(".exch." in op for op in summed) and not any(op.endswith((".f32", ".f16")) for op in summed), summed
    assert any(op.endswith("add.f32") for op in global_atomics(False))
