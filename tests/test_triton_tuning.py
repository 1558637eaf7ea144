"""kernels.triton_tuning._pick: which timer autotuning uses, and the weight replicas decode tuning rotates through;
the once-per-device probe that decides whether the GEMV reads codes as float32 subnormals (triton_operands).

Pure Python and CPU tensors: the timers are replaced by fakes that record what they were asked to run, so the logic
(decode launches timed by graph replays over replicas, the rest by do_bench, failing candidates skipped) is checked
without a GPU. tests/gpu/test_triton_linear.py runs the real replay timer on a device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

triton = pytest.importorskip("triton")

from ipex_llm_tf.formats import get_format  # noqa: E402
from ipex_llm_tf.kernels import triton_tuning as TT  # noqa: E402
from ipex_llm_tf.kernels.triton_operands import block_operands, fp8_operands, pair_table  # noqa: E402

CUDA = torch.device("cuda")


@dataclass
class FakeOperands:
    size: int
    copies: list = field(default_factory=list)

    def nbytes(self) -> int:
        return self.size

    def replica(self) -> "FakeOperands":
        copy = FakeOperands(self.size)
        self.copies.append(copy)
        return copy


@pytest.fixture
def tuning(monkeypatch: pytest.MonkeyPatch):
    """Autotuning on for a pretend CUDA device, nothing stored on disk, do_bench and the replay timer recorded."""
    monkeypatch.setattr(TT, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(TT, "_scope", lambda device: "test scope")
    monkeypatch.setattr(TT, "_TUNED", {})
    monkeypatch.setenv("IPEX_LLM_TF_TUNING_CACHE", "0")
    seen: dict[str, list] = {"do_bench": [], "replay": []}

    def fake_do_bench(fn, **kwargs):
        seen["do_bench"].append(fn)
        fn()
        return 1.0

    def fake_replay(calls, device):
        seen["replay"].append(len(calls))
        return sum(call() for call in calls) / len(calls)

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(TT, "_replay_ms", fake_replay)
    return seen


def test_decode_launches_are_timed_by_replays_over_replicas(tuning) -> None:
    """With operands, every candidate runs on every replica inside the replay timer and the fastest wins."""
    ops = FakeOperands(40 << 20)  # 40 MB: four replicas make the 160 MB rotation
    speed = {"a": 3.0, "b": 1.0, "c": 2.0}
    ran: list[tuple[str, int]] = []

    def run(cfg, replica=ops):
        ran.append((cfg, id(replica)))
        return speed[cfg]

    assert TT._pick(("gemv", 1), ["a", "b", "c"], run, CUDA, operands=ops) == "b"
    assert not tuning["do_bench"], "decode launches are not timed by do_bench"
    assert tuning["replay"] == [4, 4, 4]
    replica_ids = {id(ops)} | {id(copy) for copy in ops.copies}
    assert len(replica_ids) == 4 and {cfg for cfg, _ in ran} == {"a", "b", "c"}
    assert all({r for c, r in ran if c == cfg} == replica_ids for cfg in speed), "each candidate on each replica"
    assert TT._pick(("gemv", 1), ["a", "b", "c"], run, CUDA, operands=ops) == "b"
    assert tuning["replay"] == [4, 4, 4], "a key is timed once per process"


def test_other_launches_and_devices_use_do_bench(tuning) -> None:
    """Without operands (prefill rows), or on a device other than CUDA, candidates are timed by do_bench."""
    assert TT._pick(("mm", 64), ["a", "b"], lambda cfg: None, CUDA) == "a"
    xpu_ops = FakeOperands(1 << 20)
    assert TT._pick(("gemv", 2), ["a", "b"], lambda cfg, replica=xpu_ops: None, torch.device("xpu"),
                    operands=xpu_ops) == "a"
    assert len(tuning["do_bench"]) == 4 and not tuning["replay"] and not xpu_ops.copies


def test_a_candidate_that_fails_is_skipped(tuning) -> None:
    def run(cfg, replica=None):
        if cfg == "too big":
            raise RuntimeError("out of shared memory")
        return 2.0

    assert TT._pick(("gemv", 3), ["too big", "fits"], run, CUDA, operands=FakeOperands(1 << 30)) == "fits"


def test_replica_count_follows_weight_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Enough replicas to rotate ~160 MB, at most 8; a weight that large alone is timed alone; out of memory, alone."""
    assert len(TT.replicas_for(FakeOperands(200 << 20))) == 1
    assert len(TT.replicas_for(FakeOperands(25 << 20))) == 7
    assert len(TT.replicas_for(FakeOperands(1 << 20))) == 8

    class NoRoom(FakeOperands):
        def replica(self):
            raise torch.OutOfMemoryError("no room")

    assert len(TT.replicas_for(NoRoom(1 << 20))) == 1


@pytest.mark.parametrize("fmt_name", ["sym_int4", "asym_int5", "nf4", "nf3", "sym_int8"])
def test_block_replicas_copy_what_kernels_read(fmt_name: str) -> None:
    """A replica holds equal values in new storage, keeps the aliases of unused operands, shares the code table."""
    fmt = get_format(fmt_name)
    ops = block_operands(fmt, fmt.quantize(torch.randn(64, 256)))
    copy = ops.replica()
    for name in ("words", "scales", "mins", "qh"):
        a, b = getattr(ops, name), getattr(copy, name)
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert (copy.mins is copy.scales) == (ops.mins is ops.scales)
    assert (copy.qh is copy.words) == (ops.qh is ops.words)
    assert copy.plans == {} and copy.nbytes() == ops.nbytes() > 0
    if fmt_name in ("nf4", "nf3"):
        assert copy.table is ops.table and copy.gemv_table is ops.gemv_table


def test_nf3_pair_table_holds_both_codes_values() -> None:
    """Entry a | b << 3 (codes a and b) holds value a in its low half, then value b."""
    fmt = get_format("nf3")
    table = pair_table(fmt, torch.device("cpu"))
    assert table.dtype == torch.int64 and table.shape == (64,)
    for a in range(8):
        for b in range(8):
            entry = int(table[a | b << 3])
            halves = torch.tensor([entry & 0xFFFFFFFF, entry >> 32 & 0xFFFFFFFF], dtype=torch.int64)
            values = halves.to(torch.int32).view(torch.float32)
            assert values.tolist() == [fmt.values[a].item(), fmt.values[b].item()], (a, b)


def test_fp8_replicas_copy_what_kernels_read() -> None:
    fmt = get_format("fp8_e4m3")
    ops = fp8_operands(fmt, fmt.quantize(torch.randn(64, 256)))
    copy = ops.replica()
    assert torch.equal(copy.qweight.view(torch.uint8), ops.qweight.view(torch.uint8))
    assert copy.qweight.data_ptr() != ops.qweight.data_ptr() and torch.equal(copy.scales, ops.scales)
    assert ops.nbytes() == 64 * 256 + 64 * 4


class FakeProbe:
    """Stands in for triton_operands.subnormal_probe_kernel: writes what a device would, records each launch."""

    def __init__(self, result: float):
        self.result, self.launches = result, 0

    def __getitem__(self, grid):
        def launch(bits, x, acc, out, **options):
            self.launches += 1
            out.fill_(self.result)
        return launch


@pytest.mark.parametrize("flushes", [False, True])
def test_subnormal_probe_decides_once_per_device(monkeypatch: pytest.MonkeyPatch, flushes: bool) -> None:
    """The subnormal-coded GEMV is chosen only where the probe's product comes back exact; the answer is kept, and
    block formats outside the subnormal kinds never take it."""
    from ipex_llm_tf.kernels import triton_operands as TO
    probe = FakeProbe(0.0 if flushes else 240 * 2.0 ** -109)
    monkeypatch.setattr(TO, "subnormal_probe_kernel", probe)
    monkeypatch.setattr(TO, "_interpreting", lambda: True)
    monkeypatch.setattr(TO, "_KEEPS_SUBNORMALS", {})
    cpu = torch.device("cpu")
    assert TO.keeps_subnormals(cpu) is (not flushes)
    assert TO.keeps_subnormals(cpu) is (not flushes) and probe.launches == 1
    for name, expected in (("sym_int4", not flushes), ("sym_int8", not flushes), ("fp4", not flushes),
                           ("fp6", not flushes), ("nf4", False), ("nf3", False), ("sym_int5", False)):
        fmt = get_format(name)
        assert block_operands(fmt, fmt.quantize(torch.randn(8, 64))).subnormal is expected, name


def test_subnormal_probe_waits_outside_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a graph capture nothing is launched or synchronized: the old decoding is used and the probe runs on
    the next eager call; devices without Triton kernels are never probed."""
    from ipex_llm_tf.kernels import triton_operands as TO
    probe = FakeProbe(240 * 2.0 ** -109)
    monkeypatch.setattr(TO, "subnormal_probe_kernel", probe)
    monkeypatch.setattr(TO, "_KEEPS_SUBNORMALS", {})
    cpu = torch.device("cpu")
    monkeypatch.setattr(TO, "_interpreting", lambda: False)
    assert TO.keeps_subnormals(cpu) is False and probe.launches == 0
    monkeypatch.setattr(TO, "_interpreting", lambda: True)
    monkeypatch.setattr(TO, "capturing", lambda device: True)
    assert TO.keeps_subnormals(cpu) is False and probe.launches == 0
    monkeypatch.setattr(TO, "capturing", lambda device: False)
    assert TO.keeps_subnormals(cpu) is True and probe.launches == 1


def test_multirow_gemv_candidates_cover_two_to_eight_rows() -> None:
    """Multi-row GEMV tiles are offered for 2..GEMV_MULTIROW_MAX_ROWS rows: 2 rows a program for 2 rows, 2 or 4
    beyond; never for one row or past the limit, and their K step never exceeds the row's words."""
    assert TT.gemv_multirow_candidates(1, 512) == [] and TT.gemv_multirow_candidates(9, 512) == []
    assert {c.block_m for c in TT.gemv_multirow_candidates(2, 512)} == {2}
    for m in (3, 4, TT.GEMV_MULTIROW_MAX_ROWS):
        cands = TT.gemv_multirow_candidates(m, 512)
        assert {c.block_m for c in cands} == {2, 4} and all(c.split_k == 1 for c in cands)
    assert max(c.block_w for c in TT.gemv_multirow_candidates(4, 24)) == 32  # next power of two of 24 words


def test_gemv_reads_a_partial_last_step_apart_only_where_it_can() -> None:
    """TAIL (triton_gemv) for K not a multiple of the step, in one program per row band with the prefetch it needs;
    everything else keeps masking every step (or needs no mask)."""
    from ipex_llm_tf.kernels.triton_linear import _split_steps, _tail_step

    def tail(words: int, cfg: TT.GemvConfig) -> bool:
        _, split, even = _split_steps(words, cfg.block_w, cfg.split_k)
        return _tail_step(words, cfg, split, even)

    assert tail(1376, TT.GemvConfig(8, 128, 4))                      # 11008 / 8 words: 10 full steps and a partial
    assert not tail(512, TT.GemvConfig(8, 128, 4))                   # full steps only
    assert not tail(1376, TT.GemvConfig(8, 128, 4, prefetch=1))      # its activations load in the loop
    assert not tail(1376, TT.GemvConfig(8, 128, 4, split_k=2))       # K splits
    assert not tail(1376, TT.GemvConfig(8, 128, 4, block_m=2))       # further rows load in the loop
    assert not tail(100, TT.GemvConfig(8, 128, 4))                   # no full step


def test_whole_row_candidates_cover_rows_up_to_512_words() -> None:
    """Whole-row tiles (triton_gemv WHOLE) span a row of up to 512 code words in one step, and none is offered for
    longer rows (their programs would hold over 64 words a thread)."""
    cands = TT.gemv_whole_candidates(512)
    assert cands and all(c.block_w == 512 and c.split_k == 1 and c.prefetch > 0 for c in cands)
    assert all(c.block_n * c.block_w // (32 * c.num_warps) <= 64 for c in cands)
    assert {c.block_w for c in TT.gemv_whole_candidates(72)} == {128}  # the next power of two
    assert TT.gemv_whole_candidates(513) == [] and TT.gemv_whole_candidates(1376) == []


class _FakeKernel:
    """Stands in for gemv_words_kernel: records the keywords of each launch."""

    def __init__(self) -> None:
        self.launches: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


def test_one_step_programs_read_their_row_before_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch whose programs each take one K step with prefetch on runs WHOLE; more steps or no prefetch do
    not."""
    from ipex_llm_tf.kernels import triton_linear as TL
    fake = _FakeKernel()
    monkeypatch.setattr(TL.G, "gemv_words_kernel", fake)
    ops = block_operands(get_format("sym_int4"), get_format("sym_int4").quantize(torch.randn(8, 512)))  # 64 words
    x = torch.zeros(1, 512, dtype=torch.float16)
    for cfg, whole in ((TT.GemvConfig(8, 64, 4, 1, 2), True), (TT.GemvConfig(8, 128, 4, 1, 1), True),
                       (TT.GemvConfig(8, 32, 4, 2, 2), True),  # two K splits of one step each
                       (TT.GemvConfig(8, 32, 4, 1, 2), False), (TT.GemvConfig(8, 64, 4, 1, 0), False)):
        TL.gemv_blocks(x, ops, None, 8, cfg)
        assert fake.launches[-1].get("WHOLE", False) == whole, cfg


def test_a_gemv_after_attention_is_timed_after_it_with_whole_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a decode context (decode_context.AfterAttention) the GEMV's candidates gain the whole-row tiles, its
    tuning key records the context, and each timed run takes its input from the context's attention call."""
    from ipex_llm_tf.kernels import triton_linear as TL
    from ipex_llm_tf.kernels.decode_context import AfterAttention
    picked = {}

    def fake_pick(key, options, run, device, operands=None):
        picked.update(key=key, options=options, run=run)
        return options[0]

    made, launched = [], []
    context = AfterAttention(heads=4, kv_heads=2, head_dim=64)
    monkeypatch.setattr(TL, "_pick", fake_pick)
    monkeypatch.setattr(TL, "gemv_blocks", lambda x, ops, bias, n, cfg: launched.append(x))
    monkeypatch.setattr(AfterAttention, "input_maker",
                        lambda self, rows, dtype, device: lambda: made.append(rows) or torch.ones(rows, 4096))
    k = 4096  # 512 words a row: whole-row tiles distinct from the usual ones
    ops = block_operands(get_format("sym_int4"), get_format("sym_int4").quantize(torch.randn(8, k)))
    x = torch.zeros(1, k, dtype=torch.float16)
    TL._plan(x, ops, 8, context)
    assert picked["key"][-1] == context.tag
    whole = [cfg for _, cfg in picked["options"] if cfg in TT.gemv_whole_candidates(ops.words_per_row)]
    assert len(whole) == len(TT.gemv_whole_candidates(ops.words_per_row)) > 0
    picked["run"](picked["options"][0])
    assert made == [1] and torch.equal(launched[-1], torch.ones(1, k))
    TL._plan(x, ops, 8)  # no context: the key and candidates as before
    assert picked["key"] == ("gemv", ops.kind, 1, 8, k, torch.float16)
    assert not any(cfg in TT.gemv_whole_candidates(ops.words_per_row) for _, cfg in picked["options"])


def test_two_plane_formats_time_tiles_of_their_own() -> None:
    """nf3 and fp6 (no prefetch) get the two-plane tiles besides the shared ones, each once; the one-plane block
    formats do not, and a tile's step never exceeds a short row."""
    from ipex_llm_tf.kernels import triton_linear as TL
    device = torch.device("cpu")
    for name in ("nf3", "fp6", "sym_int4"):
        ops = block_operands(get_format(name), get_format(name).quantize(torch.randn(8, 11008)))
        cands = TL._block_gemv_candidates(1, 4096, ops, device)
        own = TT.gemv_plane_candidates(ops.words_per_row)
        assert len(cands) == len(set(cands))
        if ops.kind in TL.PLANE_KINDS:
            assert set(own) <= set(cands) and {c.prefetch for c in cands} == {0}
            assert {c.split_k for c in own} == {1, 2, 3}
        else:
            assert not set(own) & set(cands)
    assert {c.block_w for c in TT.gemv_plane_candidates(20)} == {32}  # the next power of two of 20 words
