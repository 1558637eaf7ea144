"""Overlapping consecutive decode kernels: programmatic dependent launch (PDL) where the device has it.

A decode step is ~345 short kernels; each pays a fixed cost (launch, ramp-up, a tail where few programs still run)
that no kernel change removes. With PDL a kernel may start while the one before it finishes: its programs are placed
on the SMs as the previous kernel's free them, read what no earlier kernel writes (the weights), and wait for the
previous kernel's results only where they first need them.

The kernels stay one source. Each kernel that takes part has an OVERLAP constexpr (default False) and calls
`release_next` and `wait_previous`, which compile to nothing unless OVERLAP is set. `overlap_options(device)` gives
the launch keywords that set it: on CUDA devices of compute capability 9.0 or later (the `griddepcontrol`
instructions and the launch attribute are Hopper's), and never on Intel XPU, in the interpreter, or with
IPEX_LLM_TF_OVERLAP=0. Everywhere else the kernels run exactly as without this module.

The contract every kernel launched with these options keeps: before `wait_previous` it writes nothing at all and
reads nothing that a kernel of the same step may write; a kernel launched without them is serialized as usual. As
each such kernel waits for the one before it, which waited for its own predecessor, a kernel past its wait sees
every earlier kernel's writes, not only the last one's. What earlier steps wrote is complete before a step starts
(each step is a graph replay or an eager forward that ends in non-overlapped kernels), so the RoPE variant of
decode attention reads the KV planes and the mask, written by earlier steps, before its wait.

Where the kernels let the next one in (measured on an H100, session 15, 7B decode): the GEMVs after their K loop,
so that the next kernel's programs fill the SMs their tail leaves idle; every other kernel at its start. With every
kernel releasing at its start, GEMVs included, a token was slower than with no overlap at all (2.44 and 2.49
against 2.38 ms): programs of three or four kernels then sat on the SMs waiting.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..env import env_flag, raw_env_reader

try:  # the CUDA extras of Triton; a build without them (an XPU one may lack them) never sets OVERLAP
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None

OVERLAP_ENV = "IPEX_LLM_TF_OVERLAP"
_MIN_CAPABILITY = (9, 0)
_SUPPORTED: dict[torch.device, bool] = {}
# every launch asks, so the answer is kept per device and switch value (the eager prefill is bound by host time)
_OPTIONS: dict[tuple[torch.device, object], dict] = {}
_raw_switch = raw_env_reader(OVERLAP_ENV)


@triton.jit
def release_next(OVERLAP: tl.constexpr):
    """Let the next kernel's programs launch (they wait in wait_previous for this one's results)."""
    if OVERLAP:
        gdc_launch_dependents()


@triton.jit
def wait_previous(OVERLAP: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible."""
    if OVERLAP:
        gdc_wait()


def overlap_supported(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch (CUDA sm_90+, the switch on)."""
    if device.type != "cuda" or gdc_wait is None or not env_flag(OVERLAP_ENV, True):
        return False
    if device not in _SUPPORTED:
        _SUPPORTED[device] = torch.cuda.get_device_capability(device) >= _MIN_CAPABILITY
    return _SUPPORTED[device]


def overlap_options(device: torch.device) -> dict:
    """Launch keywords for a kernel with an OVERLAP constexpr: PDL on where supported, else none (do not modify)."""
    key = (device, _raw_switch())
    options = _OPTIONS.get(key)
    if options is None:
        options = _OPTIONS[key] = {"OVERLAP": True, "launch_pdl": True} if overlap_supported(device) else {}
    return options


def describe_overlap(device: torch.device) -> str:
    """Whether decode kernels on `device` overlap their launches, and why (for `ipex-llm-tf info`)."""
    if device.type != "cuda":
        return f"kernel launches: one after another (programmatic dependent launch is CUDA-only; {device.type} " \
               f"runs the kernels unchanged)"
    if gdc_wait is None:
        return "kernel launches: one after another (this Triton has no CUDA launch-ordering functions)"
    if not env_flag(OVERLAP_ENV, True):
        return f"kernel launches: one after another ({OVERLAP_ENV}=0)"
    major, minor = torch.cuda.get_device_capability(device)
    if not overlap_supported(device):
        return (f"kernel launches: one after another (compute capability {major}.{minor}; programmatic dependent "
                f"launch needs 9.0+)")
    return f"kernel launches: overlapped (programmatic dependent launch, compute capability {major}.{minor})"
