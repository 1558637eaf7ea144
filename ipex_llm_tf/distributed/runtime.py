"""Joining the process group torchrun describes: backend per device, one device per rank, bounded waits."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..devices import best_device

# The collective library torch.distributed uses for each device type
BACKENDS = {"cuda": "nccl", "xpu": "xccl", "cpu": "gloo"}
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "IPEX_LLM_TF_TP_TIMEOUT"


class DistributedError(RuntimeError):
    """A multi-process run cannot start or lost a peer; the message says which rank, what happened, what to do."""


def timeout_seconds(timeout_s: float | None = None) -> float:
    """The explicit timeout, else IPEX_LLM_TF_TP_TIMEOUT, else 300 s: how long a rank waits for its peers."""
    if timeout_s is not None:
        value = float(timeout_s)
    else:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError as err:
            raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from err
    if value <= 0:
        raise DistributedError(f"the tensor-parallel timeout must be positive, got {value} s")
    return value


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else None


def rank_device(device_type: str) -> torch.device:
    """This rank's device: cpu, or the accelerator numbered LOCAL_RANK (as torchrun sets it)."""
    if device_type == "cpu":
        return torch.device("cpu")
    backend = getattr(torch, device_type, None)
    if backend is None or not backend.is_available():
        raise DistributedError(f"tensor parallelism on {device_type!r} was asked for but this machine has no usable "
                               f"{device_type} device; use device='cpu' (gloo) or install a matching PyTorch build")
    local_rank = _env_int("LOCAL_RANK") or 0
    count = backend.device_count()
    if local_rank >= count:
        raise DistributedError(f"local rank {local_rank} has no {device_type} device: this host has {count}; launch "
                               f"at most {count} processes per node (torchrun --nproc-per-node {count})")
    return torch.device(device_type, local_rank)


def init_tensor_parallel(device: str | None = None, timeout_s: float | None = None) -> DeviceMesh:
    """Join the default process group (torchrun's RANK / WORLD_SIZE / MASTER_ADDR) and return a 1-D mesh of all ranks.

    The backend follows the device: NCCL on CUDA, XCCL (oneCCL) on XPU, gloo on the CPU. An existing process group
    is reused as it is.
    """
    timeout = timeout_seconds(timeout_s)
    device_type = torch.device(device or best_device()).type
    if device_type not in BACKENDS:
        raise DistributedError(f"tensor parallelism runs on {sorted(BACKENDS)}, not {device_type!r}")
    if device_type != "cpu":
        target = rank_device(device_type)
        getattr(torch, device_type).set_device(target)
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; install a standard PyTorch wheel")
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise DistributedError(f"no process group and no {', '.join(missing)} in the environment: launch with "
                                   f"`torchrun --nproc-per-node N your_script.py`, or call "
                                   f"torch.distributed.init_process_group() before loading")
        backend = BACKENDS[device_type]
        if backend == "xccl" and not getattr(dist, "is_xccl_available", lambda: False)():
            raise DistributedError("this PyTorch build has no XCCL backend for XPU; install PyTorch 2.8+ for XPU")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return init_device_mesh(device_type, (dist.get_world_size(),))


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None, where: str) -> torch.Tensor:
    """Sum `tensor` over the group in place; a failed peer becomes a DistributedError naming this rank and layer."""
    try:
        dist.all_reduce(tensor, group=group)
    except RuntimeError as err:  # DistBackendError and gloo's connection errors are RuntimeErrors
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise DistributedError(f"rank {rank}: the all-reduce after {where} failed ({err}). Another rank probably "
                               f"died or stopped answering within the timeout; see its log, then relaunch all "
                               f"ranks") from err
    return tensor


def disable_graph_decode(model: torch.nn.Module) -> None:
    """Take a CUDA-graph decoder (models/graph_decode) off a model whose steps span devices or ranks.

    A captured graph records one device's stream: copies between devices, CPU-offloaded layers and torch.distributed
    collectives in the step cannot be captured, so such models decode eagerly.
    """
    from ..models.graph_decode import uninstall_graph_decode
    uninstall_graph_decode(model)
