"""Looking codes up in an 8- or 16-entry table held in registers: one warp shuffle a code, on NVIDIA GPUs.

A codebook GEMV (nf4) otherwise loads each code's value from a table in memory: an L1 hit, but one load with its
64-bit address arithmetic per weight, which bounds the kernel (triton_gemv). Here each lane of a warp holds entry
(lane % 16) of the table in one register (`lane_table`, loaded once per program), and `lane_lookup` fetches entry c
for every lane at once with `shfl.sync.idx`: its segment mask splits the warp into two 16-lane halves, so only the
code's low four bits pick the lane, and the codes need no masking.

H100, nf4 4096x11008: 20.2 -> 16.1 us (13.8 since the GEMV reads a step's activations as one tile, triton_gemv
X_TILE). The shuffles then bound the kernel (one a code, against sym_int4's 11.8 us at
about as many instructions). fp4's codes, read in place with bit moves, stay faster that way: 13.9 against 16.1 us
on 11008x4096 with every code shuffled, and shuffling two of a word's eight (work shared between the ALUs and the
shuffle unit) measured level. nf3's two-plane GEMV (triton_gemv_planes) shuffles its 3-bit codes from an 8-entry
table (segment mask 0x18: four 8-lane segments) instead of loading pairs of values: 4096x11008 26.0 -> 23.1 us.

This is PTX, so the GEMV sets LANES only on CUDA devices (`lanes_available`); Intel XPU, the interpreter and
IPEX_LLM_TF_LANE_LOOKUP=0 keep the table loads, the same source otherwise. Every lane of a warp must execute the
shuffle together, which the kernels' straight-line K loops guarantee.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..env import env_flag, raw_env_reader
from .triton_tuning import _interpreting

LANE_LOOKUP_ENV = "IPEX_LLM_TF_LANE_LOOKUP"
_raw_switch = raw_env_reader(LANE_LOOKUP_ENV)
_raw_interpret = raw_env_reader("TRITON_INTERPRET")
_AVAILABLE: dict[tuple, bool] = {}


@triton.jit
def lane_id():
    """This thread's lane in its warp (0..31)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def lane_table(tab_ptr, ENTRIES: tl.constexpr = 16):
    """This lane's entry of an ENTRIES-entry (8 or 16) float32 table (entry lane % ENTRIES), as int32 bits."""
    return tl.load(tab_ptr + (lane_id() & (ENTRIES - 1))).to(tl.int32, bitcast=True)


@triton.jit
def lane_lookup(table, codes, ENTRIES: tl.constexpr = 16):
    """table[codes % ENTRIES] as float32 for every element of codes (int32; bits above the low log2(ENTRIES) are
    ignored), from lane_table(..., ENTRIES)."""
    # c: segment mask 0x10 (two 16-lane segments) or 0x18 (four of 8), clamp 31; the source lane is the lane's
    # segment base OR the code's low bits
    if ENTRIES == 8:
        bits = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x181f, -1;", "=r,r,r", [table, codes],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        tl.static_assert(ENTRIES == 16, "lane tables hold 8 or 16 entries")
        bits = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x101f, -1;", "=r,r,r", [table, codes],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)


def lanes_available(device: torch.device) -> bool:
    """Whether kernels on `device` may look codes up by warp shuffles (LANES): CUDA, not interpreted, switch on."""
    key = (device, _raw_switch(), _raw_interpret())
    on = _AVAILABLE.get(key)
    if on is None:
        on = _AVAILABLE[key] = device.type == "cuda" and not _interpreting() and env_flag(LANE_LOOKUP_ENV, True)
    return on


def describe_lanes(device: torch.device) -> str:
    """How nf4's decode GEMV looks its codes up on `device`, and why (for `ipex-llm-tf info`)."""
    if lanes_available(device):
        return "nf4 code lookups: warp shuffles from registers"
    if device.type != "cuda":
        why = f"shuffles are CUDA-only; {device.type} loads the same values"
    elif env_flag(LANE_LOOKUP_ENV, True):
        why = "the Triton interpreter runs no PTX"
    else:
        why = f"{LANE_LOOKUP_ENV}=0"
    return f"nf4 code lookups: table loads ({why})"
