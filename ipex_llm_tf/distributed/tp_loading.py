"""Load a saved low-bit checkpoint as one tensor-parallel rank: only this rank's rows and input blocks are read."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ..hub import resolve_checkpoint_dir
from ..loading import SkeletonFiller
from ..low_bit_linear import LowBitLinear
from ..optimize import convert_as_saved, finalize, read_field
from ..serialization import (
    TensorSlice,
    count_tensors,
    iter_tensors,
    read_header,
    safetensors_files,
)
from .runtime import init_tensor_parallel, rank_device
from .sharding import ShardingError, column_ranges, local_size, row_part_slices
from .tensor_parallel import ModelShape, TensorParallelError, parallelize

COLUMN_LAYERS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "gate_proj"),
                 ("mlp", "up_proj"))
ROW_LAYERS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def _local_layer(layer: nn.Module, out_features: int, in_features: int) -> nn.Module:
    """A meta layer of the same kind and format as `layer`, sized for this rank's shard."""
    has_bias = layer.bias is not None
    bias_dtype = layer.bias.dtype if has_bias else None
    if isinstance(layer, LowBitLinear):
        return LowBitLinear(in_features, out_features, layer.fmt, bias=has_bias, device="meta", dtype=bias_dtype)
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_features, out_features, bias=has_bias, device="meta", dtype=layer.weight.dtype)
    raise TensorParallelError(f"{type(layer).__name__} layers cannot be sharded; only LowBitLinear and nn.Linear")


class ShardSelector:
    """Shrinks a meta skeleton to this rank's layer sizes and says which slice of each checkpoint tensor to read."""

    def __init__(self, model: nn.Module, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.slices: dict[str, dict[str, TensorSlice | None]] = {}  # module path -> tensor name -> slice
        self.full_specs: dict[str, dict[str, tuple[int, ...]]] = {}  # module path -> stored shapes of the full layer
        shape = ModelShape.from_config(model.config)
        shape.check(world_size)
        base_name = next((n for n, m in model.named_modules() if m is model.base_model), "")
        for index in range(len(model.base_model.layers)):
            for owner, child in COLUMN_LAYERS + ROW_LAYERS:
                path = f"{base_name}.layers.{index}.{owner}.{child}".lstrip(".")
                self._shrink(model, path, row=(owner, child) in ROW_LAYERS)

    def _shrink(self, model: nn.Module, path: str, row: bool) -> None:
        layer = model.get_submodule(path)
        n, k = layer.out_features, layer.in_features
        fmt = getattr(layer, "fmt", None)
        names = list(fmt.part_specs(n, k)) if fmt is not None else ["weight"]
        self.full_specs[path] = ({name: tuple(s) for name, (s, _) in fmt.part_specs(n, k).items()}
                                 if fmt is not None else {"weight": (n, k)})
        try:
            if row:
                local_in = local_size(k, self.world_size, f"the input features of {path}")
                slices = (row_part_slices(fmt, n, k, self.rank, self.world_size, path) if fmt is not None
                          else {"weight": (1, self.rank * local_in, (self.rank + 1) * local_in)})
                slices["bias"] = None  # added once, after the all-reduce
                local_out = n
            else:
                (start, stop), = column_ranges([n], self.rank, self.world_size, path)
                slices = {name: (0, start, stop) for name in names + ["bias"]}
                local_out, local_in = stop - start, k
        except ShardingError as err:
            raise TensorParallelError(str(err)) from err
        self.slices[path] = slices
        parent, _, child = path.rpartition(".")
        model.get_submodule(parent).register_module(child, _local_layer(layer, local_out, local_in))

    def _split(self, name: str) -> tuple[str, str] | None:
        module_path, _, attr = name.rpartition(".")
        for candidate in (module_path, module_path.removeprefix(self.prefix + "."), f"{self.prefix}.{module_path}"):
            if candidate in self.slices:
                return candidate, attr
        return None

    def check_layout(self, files: list[Path]) -> None:
        """TensorParallelError when a sharded layer's stored tensors do not have its format's block layout."""
        for path in files:
            header, _ = read_header(path)
            for name, entry in header.items():
                found = self._split(name)
                if found is None or found[1] == "bias":
                    continue
                module_path, attr = found
                expected = self.full_specs[module_path].get(attr)
                if expected is None or tuple(entry["shape"]) != expected:
                    raise TensorParallelError(
                        f"{path}: tensor {name} has shape {tuple(entry['shape'])}, but the layer's format stores "
                        f"{expected if expected else 'no such tensor'} (parts {sorted(self.full_specs[module_path])})"
                        f"; the checkpoint was written with an incompatible block layout. Re-save it with this "
                        f"ipex_llm_tf (load it in one process and call save_low_bit)")

    def select(self, name: str, shape: list[int]) -> TensorSlice | None:
        """The slice of checkpoint tensor `name` this rank reads (None: all of it)."""
        found = self._split(name)
        if found is None:
            return None
        module_path, attr = found
        return self.slices[module_path].get(attr)


def load_low_bit_tp(pretrained_model_name_or_path: str | Path, device: str | None = None,
                    optimize_model: bool = True, dtype: torch.dtype | None = None, timeout_s: float | None = None,
                    auto_class: Any = None) -> nn.Module:
    """Load a save_low_bit checkpoint as this torchrun rank's tensor-parallel shard, on this rank's device.

    Every rank must call it with the same arguments; the result's forward and generate() return the full model's
    outputs on every rank. device: "cuda" (NCCL), "xpu" (XCCL) or "cpu" (gloo); default the best one present.
    """
    if auto_class is None:
        from ..auto import AutoModelForCausalLM as auto_class
    mesh = init_tensor_parallel(device, timeout_s)
    rank, world_size = mesh.get_local_rank(), mesh.size()
    directory = resolve_checkpoint_dir(pretrained_model_name_or_path)
    field = read_field(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    ModelShape.from_config(config).check(world_size)
    model = auto_class._skeleton(config, dtype, {})
    convert_as_saved(model, field, dtype)
    selector = ShardSelector(model, rank, world_size)
    files = safetensors_files(directory)
    selector.check_layout(files)
    filler = SkeletonFiller(model, dtype, str(directory))
    filler.feed_all(iter_tensors(files, select=selector.select), count_tensors(files),
                    desc=f"Loading rank {rank}/{world_size} of {field['low_bit']}")
    filler.finish()
    auto_class._attach_generation_config(model, directory)
    model = finalize(model, field["low_bit"], field.get("modules_to_not_convert", []),
                     field.get("cpu_embedding", False), optimize_model)
    model = model.to(rank_device(mesh.device_type))
    return parallelize(model, mesh, weights_sharded=True)
