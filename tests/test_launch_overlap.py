"""Programmatic dependent launch (kernels.launch_overlap): where it is switched on, and what the kernels compile to.

No GPU is needed: the switch logic runs with a faked device capability, and the kernels are compiled for an sm_90
target by Triton (PTX, not run). tests/gpu/test_graph_decode_cuda.py checks on a device that decode gives the same
bits with it on and off.
"""
from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from ipex_llm_tf.kernels import launch_overlap as LO  # noqa: E402
from ipex_llm_tf.kernels import triton_decode_attention as DA  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv as G  # noqa: E402
from ipex_llm_tf.kernels import triton_gemv_fp8 as GF  # noqa: E402
from ipex_llm_tf.kernels import triton_kv_write as KV  # noqa: E402
from ipex_llm_tf.kernels import triton_matmul as MM  # noqa: E402
from ipex_llm_tf.kernels import triton_rms_norm  # noqa: E402
from ipex_llm_tf.kernels import triton_silu_mul as SM  # noqa: E402
from ipex_llm_tf.kernels.sm90_ptx import F16, GEMV_POINTERS, ptx_lines  # noqa: E402

_CUDA = torch.device("cuda", 0)


@pytest.fixture
def capability(monkeypatch):
    """Sets the capability the faked CUDA device reports; the probe and option caches start empty."""
    monkeypatch.setattr(LO, "_SUPPORTED", {})
    monkeypatch.setattr(LO, "_OPTIONS", {})
    monkeypatch.delenv(LO.OVERLAP_ENV, raising=False)

    def set_capability(major: int, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    return set_capability


def test_on_for_hopper_and_later(capability) -> None:
    capability(9, 0)
    assert LO.overlap_supported(_CUDA)
    assert LO.overlap_options(_CUDA) == {"OVERLAP": True, "launch_pdl": True}


def test_off_before_hopper(capability) -> None:
    capability(8, 9)
    assert not LO.overlap_supported(_CUDA)
    assert LO.overlap_options(_CUDA) == {}


@pytest.mark.parametrize("device", ["cpu", "xpu"])
def test_off_on_other_devices(capability, device: str) -> None:
    capability(9, 0)
    assert LO.overlap_options(torch.device(device)) == {}


@pytest.mark.parametrize("value", ["0", "false", "no"])
def test_switched_off_by_the_environment(capability, monkeypatch, value: str) -> None:
    capability(9, 0)
    monkeypatch.setenv(LO.OVERLAP_ENV, value)
    assert LO.overlap_options(_CUDA) == {}


def test_off_without_triton_cuda_extras(capability, monkeypatch) -> None:
    capability(9, 0)
    monkeypatch.setattr(LO, "gdc_wait", None)
    assert LO.overlap_options(_CUDA) == {}


def test_info_says_whether_and_why(capability, monkeypatch) -> None:
    capability(9, 0)
    assert LO.describe_overlap(_CUDA).startswith("kernel launches: overlapped")
    assert "CUDA-only" in LO.describe_overlap(torch.device("xpu"))
    monkeypatch.setenv(LO.OVERLAP_ENV, "0")
    assert "IPEX_LLM_TF_OVERLAP=0" in LO.describe_overlap(_CUDA)
    monkeypatch.delenv(LO.OVERLAP_ENV)
    capability(8, 0)
    LO._SUPPORTED.clear()
    assert "compute capability 8.0; programmatic dependent launch needs 9.0+" in LO.describe_overlap(_CUDA)


# a PTX store or atomic, predicated or not, that may reach global memory: not one to the CTA's own shared memory or a
# thread's local memory, which no other kernel sees (Triton 3.6, the lent H100s', stages a tile in shared memory
# before the wait)
_WRITE = re.compile(r"\s*(@!?%p\d+\s+)?(st|atom|red)\.(?!shared|local)")


@pytest.mark.parametrize("overlap", [False, True])
def test_gemv_waits_after_its_first_weights(overlap: bool) -> None:
    consts = dict(KIND=G.Q4_SYM.value, SCALE_SHIFT=0, BLOCK_N=16, BLOCK_W=128, SPLIT_K=1, HAS_BIAS=False, EVEN=True,
                  PREFETCH=1, GATED=False, SUBNORMAL=True, BLOCK_M=1, OVERLAP=overlap)
    lines = ptx_lines(G.gemv_words_kernel, GEMV_POINTERS, consts)
    if not overlap:
        assert not any("griddepcontrol" in line for line in lines)  # the same code as before the switch existed
        return
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    release = next(i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line)
    first_words = next(i for i, line in enumerate(lines) if "ld.global" in line and ".v4" in line)
    assert first_words < wait < release, "weights are read before the wait; the next kernel is let in after the loop"


SPLIT_POINTERS = {"part_ptr": "*fp32", "arrived_ptr": "*i32"}  # the tile matmuls' split partials and counters
# a folded-norm GEMV's partial sums of squares, residual in, norm weight, and h * weight out
FOLD_POINTERS = {"ss_ptr": "*fp32", "res_ptr": F16, "nw_ptr": F16, "hw_ptr": F16}
# (kernel, pointer types, constexprs): each overlapped kernel in a configuration that writes all it can (atomics,
# residual sums, cache planes, split partials)
_OVERLAPPED = {
    "gemv_words split-K, two rows": (
        G.gemv_words_kernel, {**GEMV_POINTERS, "y_ptr": "*fp32"},
        dict(KIND=G.Q4_ASYM.value, SCALE_SHIFT=0, BLOCK_N=16, BLOCK_W=128, SPLIT_K=2, HAS_BIAS=False, EVEN=False,
             PREFETCH=2, GATED=False, SUBNORMAL=False, BLOCK_M=2)),
    "gemv_words gated, four rows": (
        G.gemv_words_kernel, GEMV_POINTERS,
        dict(KIND=G.CB4.value, SCALE_SHIFT=1, BLOCK_N=16, BLOCK_W=64, SPLIT_K=1, HAS_BIAS=True, EVEN=True,
             PREFETCH=1, GATED=True, SUBNORMAL=False, BLOCK_M=4)),
    "gemv_words, the partial step read apart": (
        G.gemv_words_kernel, GEMV_POINTERS,
        dict(KIND=G.Q4_SYM.value, SCALE_SHIFT=0, BLOCK_N=8, BLOCK_W=128, SPLIT_K=1, HAS_BIAS=False, EVEN=True,
             PREFETCH=2, GATED=False, SUBNORMAL=True, BLOCK_M=1, TAIL=True)),
    "gemv_words, one whole step": (
        G.gemv_words_kernel, GEMV_POINTERS,
        dict(KIND=G.Q4_SYM.value, SCALE_SHIFT=0, BLOCK_N=16, BLOCK_W=512, SPLIT_K=1, HAS_BIAS=False, EVEN=True,
             PREFETCH=2, GATED=False, SUBNORMAL=True, BLOCK_M=1, WHOLE=True)),
    "gemv_words, folded norm: residual out": (
        G.gemv_words_kernel, {**GEMV_POINTERS, **FOLD_POINTERS},
        dict(KIND=G.Q4_SYM.value, SCALE_SHIFT=0, BLOCK_N=16, BLOCK_W=512, SPLIT_K=1, HAS_BIAS=True, EVEN=True,
             PREFETCH=2, GATED=False, SUBNORMAL=True, BLOCK_M=1, WHOLE=True, RES_OUT=True)),
    "gemv_words, folded norm: scaled out, gated": (
        G.gemv_words_kernel, {**GEMV_POINTERS, "ss_ptr": "*fp32"},
        dict(KIND=G.Q4_SYM.value, SCALE_SHIFT=0, BLOCK_N=16, BLOCK_W=128, SPLIT_K=1, HAS_BIAS=False, EVEN=True,
             PREFETCH=2, GATED=True, SUBNORMAL=True, BLOCK_M=1, res_ptr=None, nw_ptr=None, hw_ptr=None,
             SCALE_OUT=True, SS_BLOCK=256)),
    "gemv_fp8": (GF.gemv_fp8_kernel, {"x_ptr": F16, "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": F16,
                                      "y_ptr": F16},
                 dict(E5M2=False, NATIVE=True, BLOCK_N=16, BLOCK_K=256, SPLIT_K=1, HAS_BIAS=False, EVEN=True,
                      PREFETCH=1)),
    "matmul_blocks": (MM.matmul_blocks_kernel, {**GEMV_POINTERS, **SPLIT_POINTERS, "w_ptr": "*u8", "qh_ptr": "*u8"},
                      dict(KIND=G.Q4_SYM.value, SBLK_SHIFT=0, BLOCK_M=16, BLOCK_N=64, NB=2, GROUP_M=8, SPLIT_K=1,
                           HAS_BIAS=False, EVEN=True, SWAP=True)),
    "matmul_blocks, the last split sums": (
        MM.matmul_blocks_kernel, {**GEMV_POINTERS, **SPLIT_POINTERS, "w_ptr": "*u8", "qh_ptr": "*u8"},
        dict(KIND=G.Q4_SYM.value, SBLK_SHIFT=0, BLOCK_M=16, BLOCK_N=64, NB=2, GROUP_M=8, SPLIT_K=3, HAS_BIAS=True,
             EVEN=True, SWAP=True, LAST_SUMS=True)),
    "matmul_fp8": (MM.matmul_fp8_kernel, {"x_ptr": F16, "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": F16,
                                          "y_ptr": "*fp32", **SPLIT_POINTERS},
                   dict(E5M2=False, NATIVE=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SPLIT_K=2,
                        HAS_BIAS=False, EVEN=True, SWAP=False)),
    "attention split": (DA._split_kernel, {"ok_ptr": "*u8", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "part_ptr": "*fp32",
                                           "ml_ptr": "*fp32", "arrived_ptr": "*i32",
                                           **{k: F16 for k in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}},
                        dict(D=128, BLOCK_D=128, BLOCK_S=32, HAS_MASK=True, DIRECT=False, FP8=False, NATIVE=False,
                             LAST_COMBINES=True, BLOCK_P=16)),
    "attention split, RoPE and KV write in": (
        DA._split_kernel, {"ok_ptr": "*u8", "ks_ptr": F16, "vs_ptr": F16, "part_ptr": "*fp32", "ml_ptr": "*fp32",
                           "arrived_ptr": "*i32", "slot_ptr": "*i64",
                           **{k: F16 for k in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "cos_ptr", "sin_ptr")}},
        dict(D=128, BLOCK_D=128, BLOCK_S=32, HAS_MASK=True, DIRECT=False, FP8=False, NATIVE=False,
             LAST_COMBINES=True, BLOCK_P=16, ROTARY=True)),
    "rotary + KV write": (KV._rotary_kv_write_kernel, {"slot_ptr": "*i64", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
                                                       "kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv",
                                                       **{k: F16 for k in ("x_ptr", "cos_ptr", "sin_ptr", "q_ptr")}},
                          dict(BLOCK_D=64, QUANT=True)),
    "silu_mul": (SM._silu_mul_kernel, {"x_ptr": F16, "out_ptr": F16}, dict(BLOCK=1024)),
    "rms_norm + residual": (triton_rms_norm._rms_norm_kernel, {k: F16 for k in ("x_ptr", "w_ptr", "out_ptr",
                                                                                 "res_ptr", "sum_ptr")},
                            dict(BLOCK=4096, idx_ptr=None)),
    "embedding + rms_norm": (triton_rms_norm._rms_norm_kernel, {"idx_ptr": "*i64", **{k: F16 for k in (
        "x_ptr", "w_ptr", "out_ptr", "sum_ptr")}}, dict(BLOCK=4096, res_ptr=None, res_row_stride=0)),
}


@pytest.mark.parametrize("name", list(_OVERLAPPED))
def test_overlapped_kernels_write_nothing_before_the_wait(name: str) -> None:
    """The contract that makes the overlap safe, checked in each overlapped kernel's sm_90 code: one wait, and no
    store or atomic before it (a write there could land while the previous kernel still reads)."""
    kernel, pointers, consts = _OVERLAPPED[name]
    lines = ptx_lines(kernel, pointers, {**consts, "OVERLAP": True})
    waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    assert len(waits) == 1 and any("griddepcontrol.launch_dependents" in line for line in lines)
    writes = [line.strip() for line in lines[:waits[0]] if _WRITE.match(line)]
    assert not writes, writes


def test_rms_norm_reads_its_weight_before_the_wait() -> None:
    consts = dict(BLOCK=4096, res_ptr=None, sum_ptr=None, res_row_stride=0, idx_ptr=None, OVERLAP=True)  # no residual
    lines = ptx_lines(triton_rms_norm._rms_norm_kernel, {k: F16 for k in ("x_ptr", "w_ptr", "out_ptr")}, consts)
    loads = [i for i, line in enumerate(lines) if "ld.global" in line]
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    assert loads[0] < wait < loads[-1]


def _loads_around_the_wait(lines: list[str], pattern: str) -> tuple[int, int]:
    """How many global loads matching `pattern` come before and after the (one) wait."""
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    loads = [i for i, line in enumerate(lines) if "ld.global" in line and pattern in line]
    return sum(i < wait for i in loads), sum(i > wait for i in loads)


def test_whole_row_gemv_reads_every_weight_word_before_the_wait() -> None:
    """WHOLE: the program's one step of words (16-byte loads) is all in flight before the wait, none read after."""
    kernel, pointers, consts = _OVERLAPPED["gemv_words, one whole step"]
    before, after = _loads_around_the_wait(ptx_lines(kernel, pointers, {**consts, "OVERLAP": True}), ".v4")
    assert before == 16 and after == 0  # 512 words x 16 rows over 128 threads: 16 loads of four words


def test_attention_with_rope_reads_its_first_keys_before_the_wait() -> None:
    """The RoPE variant's planes and mask are earlier steps' writes, so its first keys and values are read before
    the wait; the plain kernel (after a separate KV write) reads them after it."""
    for name, early in (("attention split, RoPE and KV write in", True), ("attention split", False)):
        kernel, pointers, consts = _OVERLAPPED[name]
        before, after = _loads_around_the_wait(ptx_lines(kernel, pointers, {**consts, "OVERLAP": True}), ".v4")
        assert (before > 0) == early and after > 0, (name, before, after)


def test_folded_norm_gemvs_read_what_they_add_after_the_wait() -> None:
    """RES_OUT's residual and norm weight and SCALE_OUT's partial sums (the previous kernels' writes, or beside them)
    are read after the wait: against the same GEMV without the epilogue, every added load comes after it."""
    for name in ("gemv_words, folded norm: residual out", "gemv_words, folded norm: scaled out, gated"):
        kernel, pointers, consts = _OVERLAPPED[name]
        plain = {k: v for k, v in consts.items() if k not in ("RES_OUT", "SCALE_OUT", "SS_BLOCK")}
        folded = _loads_around_the_wait(ptx_lines(kernel, pointers, {**consts, "OVERLAP": True}), "")
        unfolded = _loads_around_the_wait(ptx_lines(kernel, pointers, {**plain, "OVERLAP": True}), "")
        assert folded[0] == unfolded[0] and folded[1] > unfolded[1], (name, folded, unfolded)
