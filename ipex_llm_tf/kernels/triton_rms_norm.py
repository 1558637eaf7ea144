"""RMSNorm as one Triton kernel (one program per row); reference: kernels.reference.rms_norm_reference.

Numerics follow transformers' Llama: the statistics in float32, the normalised row rounded to the input dtype, then
multiplied by the weight in the result dtype, so outputs match the reference bit for bit up to rsqrt rounding.
add_rms_norm also adds a residual first (rounded to the dtype, as the eager `residual + x` is) and returns that sum
too: a decoder layer's residual add and the next norm in one pass instead of two kernels.
Plain tl ops only, so the source runs on CUDA, Intel XPU and the Triton interpreter alike.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grids import next_power_of_2
from .launch_overlap import overlap_options, release_next, wait_previous


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, eps,
                     BLOCK: tl.constexpr, res_ptr=None, sum_ptr=None, res_row_stride=0, idx_ptr=None,
                     OVERLAP: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    source = row
    if idx_ptr is not None:  # embed_rms_norm: the row is a table row picked by an index (a token id)
        source = tl.load(idx_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    # the weight is read first: issued after the reduction, its load would start only once the sum was done
    release_next(OVERLAP)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    wait_previous(OVERLAP)
    x = tl.load(x_ptr + source * x_row_stride + cols, mask=inside, other=0.0)
    if res_ptr is not None:
        x = tl.load(res_ptr + row * res_row_stride + cols, mask=inside, other=0.0) + x
    if sum_ptr is not None:  # the sum with the residual, or the gathered row
        tl.store(sum_ptr + row * n_cols + cols, x, mask=inside)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(variance + eps)).to(x.dtype)
    y = w.to(out_ptr.dtype.element_ty) * normed.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + cols, y, mask=inside)


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(rows: torch.Tensor, weight: torch.Tensor, eps: float, res: torch.Tensor | None = None,
            summed: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """The normalised rows (of res + rows, written to summed, when a residual is given; of the rows picked by
    `index`, written to summed, when an index is given), one program per row."""
    n = rows.shape[-1]
    count = rows.shape[0] if index is None else index.numel()
    out = torch.empty((count, n), dtype=torch.promote_types(rows.dtype, weight.dtype), device=rows.device)
    if count:
        _rms_norm_kernel[(count,)](rows, weight, out, n, rows.stride(0), out.stride(0), eps,
                                   BLOCK=next_power_of_2(n), res_ptr=res, sum_ptr=summed,
                                   res_row_stride=0 if res is None else res.stride(0), idx_ptr=index,
                                   num_warps=4 if n <= 4096 else 8, enable_fp_fusion=True,
                                   **overlap_options(rows.device))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalise(x) over the last dim, in promote(x.dtype, weight.dtype)."""
    return _launch(_rows(x), weight, eps).view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) for x and residual of one shape and dtype, in one kernel."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rms_norm needs x and residual alike, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(residual.shape)} {residual.dtype}")
    rows = _rows(x)
    summed = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    return _launch(rows, weight, eps, _rows(residual), summed).view(x.shape), summed.view(x.shape)


def embed_rms_norm(ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(table[ids]), table[ids]) [*ids.shape, D]: an embedding lookup and the first norm in one kernel."""
    if ids.dtype not in (torch.int32, torch.int64) or table.dim() != 2 or table.stride(-1) != 1:
        raise ValueError(f"embed_rms_norm takes integer ids and a [vocab, D] table with unit last stride, got ids "
                         f"{ids.dtype} and a table {tuple(table.shape)}")
    index = ids.reshape(-1).contiguous()
    gathered = torch.empty((index.numel(), table.shape[1]), dtype=table.dtype, device=table.device)
    normed = _launch(table, weight, eps, summed=gathered, index=index)
    shape = (*ids.shape, table.shape[1])
    return normed.view(shape), gathered.view(shape)
