"""The next greedy decode step's static inputs from the last step's logits, as one Triton kernel (models.early_steps).

Per batch row: the token is the argmax of the row's logits (the first index among equal maxima, as torch.argmax), the
RoPE position moves on by one, and the key at the new slot becomes visible; the shared cache slot is set. Reference:
next_greedy_inputs_reference (torch.argmax and three in-place updates, four kernels, ~16 us of device time a token on
an H100, 10 us of it the vocabulary-wide argmax as one block of torch's reduction). NaN logits may give another token
than torch.argmax does: the early step then misses and generate() replays the step from its real inputs. Plain tl
ops: CUDA, XPU and the interpreter.

The kernel also copies the logits out (copy_to) for generate(): the clone it replaces was a kernel of its own and a
hop between streams on the way from one early step to the next. A program steps through its row MAX_BLOCK logits
at a time with 16 warps. H100, 32000 fp16 logits, launches back to back in a graph (session 24): 3.8 us with the
copy, against 4.1 for 4096-lane steps of 8 warps, 9.0 for one 32768-lane step of 32 warps, and 4.9 us plus 1.1 for
the clone before.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grids import next_power_of_2

MAX_BLOCK = 8192  # logits a program compares per step of its loop over the vocabulary, at most


@triton.jit
def _greedy_inputs_kernel(logits_ptr, copy_ptr, ids_ptr, pos_ptr, ok_ptr, slot_ptr, vocab, stride_logits,
                          stride_copy, stride_ok, slot, BLOCK: tl.constexpr, COPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        at = start + lanes
        raw = tl.load(logits_ptr + row * stride_logits + at, mask=at < vocab, other=float("-inf"))
        if COPY:
            tl.store(copy_ptr + row * stride_copy + at, raw, mask=at < vocab)
        x = raw.to(tl.float32)
        better = x > best  # strictly: a lane keeps its first maximum, as the chunks come in index order
        best = tl.where(better, x, best)
        best_at = tl.where(better, at, best_at)
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, best_at, vocab), axis=0)  # the first index holding the maximum
    tl.store(ids_ptr + row, token.to(tl.int64))
    tl.store(pos_ptr + row, tl.load(pos_ptr + row) + 1)
    tl.store(ok_ptr + row * stride_ok + slot, 1)
    if row == 0:
        tl.store(slot_ptr, slot)


def next_greedy_inputs(logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, key_ok: torch.Tensor,
                       slot: torch.Tensor, length: int, copy_to: torch.Tensor | None = None) -> None:
    """ids[b] = argmax(logits[b]), positions[b] += 1, key_ok[b, length] = True, slot[0] = length, in place, for
    logits [B, V], ids and positions [B, 1] int64, key_ok [B, S] bool and slot [1] int64; and copy_to[:] = logits
    when given ([B, V], logits' dtype)."""
    batch, vocab = logits.shape
    if ids.shape != (batch, 1) or positions.shape != (batch, 1) or key_ok.shape[0] != batch \
            or not 0 <= length < key_ok.shape[1] or slot.numel() != 1 or ids.dtype != torch.long \
            or positions.dtype != torch.long or key_ok.dtype != torch.bool or slot.dtype != torch.long:
        raise ValueError(f"next_greedy_inputs takes logits [B, V], int64 ids / positions [B, 1], a bool key_ok "
                         f"[B, S] with 0 <= length < S and an int64 slot [1]; got {tuple(logits.shape)}, ids "
                         f"{tuple(ids.shape)} {ids.dtype}, positions {tuple(positions.shape)} {positions.dtype}, "
                         f"key_ok {tuple(key_ok.shape)} {key_ok.dtype}, slot {tuple(slot.shape)} {slot.dtype}, "
                         f"length {length}")
    if copy_to is not None and (copy_to.shape != logits.shape or copy_to.dtype != logits.dtype
                                or copy_to.device != logits.device or copy_to.stride(-1) != 1):
        raise ValueError(f"copy_to must be a [B, V] tensor like the logits with unit last stride; got "
                         f"{tuple(copy_to.shape)} {copy_to.dtype} on {copy_to.device} for logits "
                         f"{tuple(logits.shape)} {logits.dtype} on {logits.device}")
    if logits.stride(-1) != 1 or not (ids.is_contiguous() and positions.is_contiguous() and key_ok.stride(-1) == 1):
        raise ValueError("next_greedy_inputs writes the step's own static inputs: contiguous rows are expected")
    if batch:
        block = min(MAX_BLOCK, next_power_of_2(vocab))
        copy = logits if copy_to is None else copy_to
        _greedy_inputs_kernel[(batch,)](logits, copy, ids, positions, key_ok.view(torch.uint8), slot, vocab,
                                        logits.stride(0), copy.stride(0), key_ok.stride(0), length, BLOCK=block,
                                        COPY=copy_to is not None, num_warps=max(4, block // 512))
