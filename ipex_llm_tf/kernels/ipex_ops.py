"""Optional fused ops from intel-extension-for-pytorch (`ipex.llm.functional`), behind the kernels dispatch.

ipex is never required and never imported at package import: `installed()` asks importlib's finder only, and
`functional()` imports ipex on the first call that actually runs one of its ops. Each wrapper takes and returns
exactly what the matching reference op does (kernels/reference.py); `*_applies` says when a call can go to ipex at
all, and the dispatch falls back to the reference otherwise.

Fused attention is not wrapped: ipex's `indirect_access_kv_cache_attention` and `paged_attention` need ipex's own
KV-cache layouts, and `varlen_attention` takes packed sequences without a cache, while our attention reads and
writes the transformers Cache object that generate() owns; on the CPU ipex's plain SDPA path is torch's anyway.
"""
from __future__ import annotations

import importlib.util
from functools import cache
from typing import Any

import torch

MODULE = "intel_extension_for_pytorch"
# The ops an "ipex" backend can take over, by the names the dispatch uses
OPS = ("rms_norm", "rotary", "silu_mul")


class IpexUnavailableError(ImportError, ValueError):
    """IPEX_LLM_TF_BACKEND=ipex, but intel-extension-for-pytorch cannot be imported here."""


@cache
@cache
def installed() -> bool:
    """Whether an ipex distribution is present, found without importing it (importing costs seconds).

    Cached: the ops ask on every call, and a sys.path scan per RMSNorm would cost milliseconds per decoded token.
    """
    return importlib.util.find_spec(MODULE) is not None


def require() -> None:
    """IpexUnavailableError, saying what to install, unless ipex is installed (checked without importing it)."""
    if not installed():
        raise IpexUnavailableError(
            "IPEX_LLM_TF_BACKEND=ipex needs intel-extension-for-pytorch, which is not installed; "
            "pip install 'ipex-llm-tf[ipex]' with the torch version that ipex release pins (2.8.x for ipex 2.8), "
            "or unset IPEX_LLM_TF_BACKEND")


_functional: Any = None


def functional() -> Any:
    """ipex.llm.functional, importing ipex on first use; IpexUnavailableError (why, what to install) otherwise."""
    global _functional
    if _functional is not None:
        return _functional
    require()
    try:
        from intel_extension_for_pytorch.llm import functional as module
    except Exception as err:  # ipex raises whatever its own imports raise (version mismatch, missing symbols)
        raise IpexUnavailableError(
            f"intel-extension-for-pytorch is installed but does not import ({type(err).__name__}: {err}); it must "
            f"match torch's major.minor version ({torch.__version__}) and, for 2.8, transformers < 5.24") from err
    _functional = module
    return module


def version() -> str | None:
    """The installed ipex version from its metadata (no import), or None."""
    if not installed():
        return None
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("intel-extension-for-pytorch")
    except PackageNotFoundError:
        return "unknown"


# -- RMSNorm --------------------------------------------------------------------------------------------------------

def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ipex's RMSNorm returns what rms_norm_reference would (dtype included)."""
    # ipex returns x's dtype, while the reference promotes (bf16 input * fp32 weight -> fp32): same dtypes only
    return x.dtype == weight.dtype and x.is_floating_point() and x.device == weight.device


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ipex.llm.functional.rms_norm over the last dim (statistics in float32, one rounding at the end)."""
    # the kernel walks rows of the last dim; Qwen3's q/k norms hand it strided views of the merged qkv output
    return functional().rms_norm(x.contiguous(), weight, eps)


# -- rotary embedding -----------------------------------------------------------------------------------------------

def rotary_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ipex's RoPE can stand in for apply_rotary here: full-width rotate_half tables, one per token."""
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    batch, _, seq, head_dim = x.shape
    # partial rotary (cos narrower than head_dim) would need ipex's rotary_dim < head_dim path, which we do not use
    return tuple(cos.shape) == (batch, seq, head_dim) and head_dim % 2 == 0 and cos.device == x.device


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for x [batch, heads, seq, head_dim] from cos/sin [batch, seq, head_dim] (transformers' layout)."""
    batch, heads, seq, head_dim = x.shape
    # ipex indexes its sin/cos rows by token; the 3-D form [tokens, heads, head_dim] gives every (batch, position)
    # its own row, which left-padded batches need (their positions differ per sequence)
    tokens = x.transpose(1, 2).reshape(batch * seq, heads, head_dim)
    if tokens.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        tokens = tokens.clone()  # ipex writes its result into its inputs; never into the caller's tensor
    # rotary_half=True is transformers' rotate_half pairing (element i with i + head_dim/2); ipex reads only the
    # first half of each table row, which is all there is: transformers builds them as cat(freqs, freqs)
    # ipex rotates a query and a key per call; a one-head dummy key keeps the unused half of the work negligible
    dummy_key = x.new_zeros(batch * seq, 1, head_dim)
    out, _ = functional().rotary_embedding(tokens, dummy_key, sin.reshape(batch * seq, head_dim),
                                           cos.reshape(batch * seq, head_dim), head_dim, True)
    return out.view(batch, seq, heads, head_dim).transpose(1, 2)


# -- SiLU and mul ---------------------------------------------------------------------------------------------------

def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for [gate | up] along the last dim, by ipex.llm.functional.silu_mul."""
    gate, up = gate_up.chunk(2, dim=-1)
    return functional().silu_mul(gate, up)
