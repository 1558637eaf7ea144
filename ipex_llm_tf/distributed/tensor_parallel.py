"""Tensor parallelism for Llama-family decoders whose Linear layers hold packed low-bit weights.

The plan is Megatron's: q/k/v and gate/up are column-parallel (each rank keeps whole heads and a slice of the
intermediate channels, so attention and the MLP's activation run locally), o_proj and down_proj are row-parallel
(each rank multiplies its slice of input blocks and an all-reduce sums the partial outputs, the bias added once).
Embedding, norms and the output head are replicated. It is applied through torch.distributed's
`parallelize_module` with a DeviceMesh; our styles hold each rank's shard as plain local tensors rather than
DTensors, because the low-bit kernels (PyTorch's int4 pack, Triton) take plain packed tensors and DTensor has no
sharding rules for them.
"""
from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from ..low_bit_linear import LowBitLinear
from ..models.common import ConcatProjections
from .runtime import all_reduce_sum, disable_graph_decode
from .sharding import (
    ShardingError,
    column_ranges,
    column_shard_parts,
    local_size,
    row_part_slices,
    row_shard_parts,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class TensorParallelError(ValueError):
    """The model or checkpoint cannot be split over these ranks; the message says why and what to do."""


@dataclass(frozen=True)
class ModelShape:
    """The head and channel counts of a decoder that the plan splits."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the counts from a transformers config; TensorParallelError for an unsupported architecture."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise TensorParallelError(f"no tensor-parallel plan for model_type {model_type!r}; supported: "
                                      f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use device_map='auto' to spread it over "
                                      f"devices layer by layer instead")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, kv_heads, head_dim, config.intermediate_size)

    def check(self, world_size: int) -> None:
        """TensorParallelError unless every split of the plan is even for this world size."""
        for total, what in ((self.num_heads, "attention heads"), (self.num_kv_heads, "key/value heads"),
                            (self.intermediate_size, "MLP intermediate channels")):
            if world_size < 1 or total % world_size:
                options = [n for n in range(1, self.num_kv_heads + 1)
                           if self.num_heads % n == 0 and self.num_kv_heads % n == 0
                           and self.intermediate_size % n == 0]
                raise TensorParallelError(
                    f"world size {world_size} does not divide the model's {total} {what} ({self.num_heads} "
                    f"attention heads, {self.num_kv_heads} key/value heads, {self.intermediate_size} MLP channels); "
                    f"launch with --nproc-per-node among {options}")


def _adopt(layer: nn.Module, out_features: int, in_features: int, parts: dict[str, torch.Tensor],
           bias: torch.Tensor | None) -> None:
    """Make `layer` (LowBitLinear or nn.Linear) hold this rank's shard, in place (parallelize_module needs that)."""
    if isinstance(layer, LowBitLinear):
        layer._rows, layer._cols = out_features, in_features
        layer.out_features, layer.in_features = out_features, in_features
        layer.load_parts(parts)
    else:
        layer.out_features, layer.in_features = out_features, in_features
        layer.weight = nn.Parameter(parts["weight"], requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)


def _weight_parts(layer: nn.Module, where: str) -> dict[str, torch.Tensor]:
    if isinstance(layer, LowBitLinear):
        return layer.parts
    if isinstance(layer, nn.Linear):
        return {"weight": layer.weight.detach()}
    raise TensorParallelError(f"{where} is a {type(layer).__name__}; the tensor-parallel plan shards LowBitLinear and "
                              f"nn.Linear layers only")


class LowBitColwiseParallel(ParallelStyle):
    """Keep this rank's share of every output section (q, k, v or gate, up) of a LowBitLinear / nn.Linear."""

    def __init__(self, sections: Sequence[int], weights_sharded: bool = False, where: str = "") -> None:
        super().__init__()
        self.sections, self.weights_sharded, self.where = tuple(sections), weights_sharded, where

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if self.weights_sharded:  # loaded as this rank's shard already: outputs are local, nothing to add
            return module
        rank, world_size = device_mesh.get_local_rank(), device_mesh.size()
        if isinstance(module, ConcatProjections):  # projections of mixed formats: each one is its own section
            for index, layer in enumerate(module.projections):
                LowBitColwiseParallel([layer.out_features], where=f"{self.where}.projections.{index}")._apply(
                    layer, device_mesh)
            module.out_features = sum(layer.out_features for layer in module.projections)
            return module
        if sum(self.sections) != module.out_features:
            raise TensorParallelError(f"{self.where}: sections {self.sections} do not add up to its "
                                      f"{module.out_features} output features")
        ranges = column_ranges(self.sections, rank, world_size, self.where)
        parts = column_shard_parts(_weight_parts(module, self.where), ranges)
        bias = None if module.bias is None else column_shard_parts({"b": module.bias.detach()}, ranges)["b"]
        _adopt(module, sum(b - a for a, b in ranges), module.in_features, parts, bias)
        return module


class LowBitRowwiseParallel(ParallelStyle):
    """Keep this rank's input blocks of a LowBitLinear / nn.Linear; all-reduce its outputs, adding the bias once."""

    def __init__(self, weights_sharded: bool = False, where: str = "") -> None:
        super().__init__()
        self.weights_sharded, self.where = weights_sharded, where

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rank, world_size = device_mesh.get_local_rank(), device_mesh.size()
        if not self.weights_sharded:
            parts = _weight_parts(module, self.where)
            if isinstance(module, LowBitLinear):
                slices = row_part_slices(module.fmt, module.out_features, module.in_features, rank, world_size,
                                         self.where)
            else:
                local = local_size(module.in_features, world_size, f"the input features of {self.where}")
                slices = {"weight": (1, rank * local, (rank + 1) * local)}
            local_in = local_size(module.in_features, world_size, f"the input features of {self.where}")
            _adopt(module, module.out_features, local_in, row_shard_parts(parts, slices), None)
        # Each rank's partial product must not carry the bias, or the sum would hold it world_size times
        bias = module.bias
        module.bias = None
        module.register_buffer("tp_bias", None if bias is None else bias.detach(), persistent=False)
        group, where = device_mesh.get_group(), self.where or type(module).__name__

        def reduce_partial_sums(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            all_reduce_sum(output, group, where)
            return output if layer.tp_bias is None else output.add_(layer.tp_bias.to(output.dtype))

        module.register_forward_hook(reduce_partial_sums)
        return module


class HeadCounts(ParallelStyle):
    """Tell a fused attention module how many query / key-value heads this rank computes."""

    def __init__(self, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if hasattr(module, "num_key_value_heads"):  # FusedAttention; transformers' own attention infers them
            module.num_heads, module.num_key_value_heads = self.num_heads, self.num_kv_heads
        return module


def tensor_parallel_plan(model: nn.Module, world_size: int, weights_sharded: bool = False) -> dict[str, ParallelStyle]:
    """The parallelize_module plan for a Llama / Mistral / Qwen2 model, fused (qkv_proj, gate_up_proj) or not."""
    shape = ModelShape.from_config(model.config)
    shape.check(world_size)
    base_name = next((name for name, module in model.named_modules() if module is model.base_model), "")
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TensorParallelError(f"{type(model).__name__} has no decoder `layers`; no tensor-parallel plan fits it")
    q_out, kv_out = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    plan: dict[str, ParallelStyle] = {}
    for index, layer in enumerate(layers):
        prefix = f"{base_name}.layers.{index}".lstrip(".")
        columns: list[tuple[str, tuple[int, ...]]] = []
        if hasattr(layer.self_attn, "qkv_proj"):
            columns.append(("self_attn.qkv_proj", (q_out, kv_out, kv_out)))
        else:
            columns += [("self_attn.q_proj", (q_out,)), ("self_attn.k_proj", (kv_out,)), ("self_attn.v_proj", (kv_out,))]
        if hasattr(layer.mlp, "gate_up_proj"):
            columns.append(("mlp.gate_up_proj", (shape.intermediate_size, shape.intermediate_size)))
        else:
            columns += [("mlp.gate_proj", (shape.intermediate_size,)), ("mlp.up_proj", (shape.intermediate_size,))]
        for name, sections in columns:
            plan[f"{prefix}.{name}"] = LowBitColwiseParallel(sections, weights_sharded, f"{prefix}.{name}")
        plan[f"{prefix}.self_attn"] = HeadCounts(shape.num_heads // world_size, shape.num_kv_heads // world_size)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"{prefix}.{name}"] = LowBitRowwiseParallel(weights_sharded, f"{prefix}.{name}")
    return plan


def parallelize(model: nn.Module, device_mesh: DeviceMesh, weights_sharded: bool = False) -> nn.Module:
    """Split a loaded low-bit model over the mesh's ranks in place (each rank holding the full model to start with).

    With weights_sharded=True the layers already hold this rank's shard (load_low_bit_tp) and only the all-reduces
    are installed.
    """
    if getattr(model, "_ipex_llm_tf_tp", None) is not None:
        raise TensorParallelError("this model is already tensor-parallel; load a fresh copy to parallelize again")
    if device_mesh.ndim != 1:
        raise TensorParallelError(f"tensor parallelism takes a 1-D device mesh, got {device_mesh.ndim} dimensions")
    try:
        plan = tensor_parallel_plan(model, device_mesh.size(), weights_sharded)
    except ShardingError as err:
        raise TensorParallelError(str(err)) from err
    # Validate every row-parallel split before touching any layer, so a bad world size changes nothing
    for path, style in plan.items():
        module = model.get_submodule(path)
        if isinstance(style, LowBitRowwiseParallel) and isinstance(module, LowBitLinear) and not weights_sharded:
            try:
                row_part_slices(module.fmt, module.out_features, module.in_features, 0, device_mesh.size(), path)
            except ShardingError as err:
                raise TensorParallelError(str(err)) from err
    disable_graph_decode(model)
    parallelize_module(model, device_mesh, plan)
    if not weights_sharded:
        for module in model.modules():
            if getattr(module, "_separate_sizes", None):  # fused q/k/v, gate/up: state_dict splits local rows now
                module._separate_sizes = tuple(size // device_mesh.size() for size in module._separate_sizes)
    model._ipex_llm_tf_tp = {"world_size": device_mesh.size(), "rank": device_mesh.get_local_rank()}
    model.save_low_bit = types.MethodType(_refuse_save, model)
    model.push_to_hub = types.MethodType(_refuse_save, model)
    return model


def _refuse_save(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise TensorParallelError("a tensor-parallel rank holds only its shard of the weights; save the model from a "
                              "single process (AutoModelForCausalLM.load_low_bit(...).save_low_bit(...)) instead")
