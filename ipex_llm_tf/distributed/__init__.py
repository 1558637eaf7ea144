"""Beyond one device: device_map placement (layers over devices, CPU for the rest) and tensor parallelism.

Tensor parallelism runs on torch.distributed (NCCL on CUDA, XCCL on XPU, gloo on the CPU), one process per device,
launched with `torchrun --nproc-per-node N script.py`; see README "Multi-device".
"""
from __future__ import annotations

from .device_map import (
                         DeviceMapError,
                         check_device_map,
                         dispatch_model,
                         infer_device_map,
                         memory_report,
                         place_model,
                         plan_placement,
)
from .runtime import DistributedError, init_tensor_parallel, rank_device
from .sharding import ShardingError
from .tensor_parallel import (
                         LowBitColwiseParallel,
                         LowBitRowwiseParallel,
                         ModelShape,
                         TensorParallelError,
                         parallelize,
                         tensor_parallel_plan,
)
from .tp_loading import load_low_bit_tp

__all__ = ["DeviceMapError", "DistributedError", "LowBitColwiseParallel", "LowBitRowwiseParallel", "ModelShape",
           "ShardingError", "TensorParallelError", "check_device_map", "dispatch_model", "infer_device_map",
           "init_tensor_parallel", "load_low_bit_tp", "memory_report", "parallelize", "place_model",
           "plan_placement", "rank_device", "tensor_parallel_plan"]
