"""device_map for low-bit models: place whole decoder layers on devices by their packed size, the rest on the CPU.

accelerate is not needed: a low-bit model's size is known exactly from its packed buffers, and placement is a greedy
fill of the visible accelerators in execution order (balanced across them for "auto"), with what does not fit left
on the CPU, where it runs with the CPU kernels (weights are not streamed to the accelerator at every step).
Forward pre-hooks move each placed module's inputs to its device, so generate() works unchanged.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..bench import peak_memory_mib
from ..devices import DeviceError, check_device
from ..serialization import parse_size
from .runtime import disable_graph_decode

logger = logging.getLogger("ipex_llm_tf")

STRATEGIES = ("auto", "balanced", "sequential")
# share of an accelerator's free memory kept for activations and the KV cache when max_memory does not say
HEADROOM = 0.10


class DeviceMapError(ValueError):
    """A device_map or max_memory cannot be applied to this model; the message says what to change."""


def _accelerator_type() -> str | None:
    for name in ("xpu", "cuda"):
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_available():
            return name
    return None


def normalize_device(value: Any) -> str:
    """'cpu', 'cuda:1', 1 (the accelerator with that index) or torch.device -> a checked device string."""
    if isinstance(value, str) and value in ("disk", "meta"):
        raise DeviceMapError(f"device_map value {value!r} is not supported for low-bit models: layers run where they "
                             f"are placed; map them to an accelerator or 'cpu'")
    if isinstance(value, int) and not isinstance(value, bool):
        kind = _accelerator_type()
        if kind is None:
            raise DeviceError(f"device_map value {value} means accelerator {value}, but this machine has none; "
                              f"use 'cpu'")
        value = f"{kind}:{value}"
    device = check_device(value)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, 0)
    return str(device)


def _tensors(module: nn.Module, recurse: bool = True):
    yield from (t for t in module.parameters(recurse=recurse) if t is not None)
    yield from (t for t in module.buffers(recurse=recurse) if t is not None)


def module_bytes(module: nn.Module, seen: set | None = None) -> int:
    """Bytes of a module's parameters and buffers (packed low-bit tensors included), each storage counted once."""
    seen = set() if seen is None else seen
    total = 0
    for tensor in _tensors(module):
        key = (tensor.untyped_storage().data_ptr(), tensor.device) if tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def placement_units(model: nn.Module) -> list[str]:
    """Module names placed as a whole, in execution order: the decoder's layers one by one, everything else whole."""
    base = getattr(model, "base_model", model)
    base_name = next((name for name, module in model.named_modules() if module is base), "")
    units: list[str] = []
    for name, child in base.named_children():
        path = f"{base_name}.{name}".lstrip(".")
        if isinstance(child, nn.ModuleList):
            units += [f"{path}.{index}" for index in range(len(child))]
        else:
            units.append(path)
    units += [name for name, _ in model.named_children() if model.get_submodule(name) is not base]
    return units


def plan_placement(sizes: dict[str, int], budgets: dict[str, float], strategy: str = "auto",
                   same_device: dict[str, str] | None = None) -> dict[str, str]:
    """Greedy placement of units (in order) onto devices (in order; "cpu" last takes the rest) within budgets.

    "sequential" fills each accelerator before the next; "auto" / "balanced" aims at an equal share per accelerator.
    same_device pins a unit to another unit's device (a tied output head to its embedding).
    """
    if strategy not in STRATEGIES:
        raise DeviceMapError(f"device_map={strategy!r} is not a placement strategy; use one of {STRATEGIES} or a "
                             f"dict of module name -> device")
    same_device = same_device or {}
    accelerators = [d for d in budgets if d != "cpu"]
    free = dict(budgets)
    movable = sum(size for name, size in sizes.items() if name not in same_device)
    target = {d: free[d] for d in accelerators}
    if strategy != "sequential" and accelerators:
        share = movable / len(accelerators) + max(sizes.values(), default=0)
        target = {d: min(free[d], share) for d in accelerators}
    placed: dict[str, str] = {}
    used = {d: 0 for d in budgets}
    order = accelerators + ["cpu"]
    current = 0
    for name, size in sizes.items():
        if name in same_device:
            continue
        while current < len(accelerators) and used[order[current]] + size > target[order[current]]:
            current += 1
        device = order[current]
        if device == "cpu" and used["cpu"] + size > budgets.get("cpu", float("inf")):
            raise DeviceMapError(f"the model does not fit: {name} ({size / 2**20:.0f} MiB) fits neither the "
                                 f"accelerators nor the CPU budget; raise max_memory or use a smaller format "
                                 f"(disk offload is not supported)")
        placed[name] = device
        used[device] += size
    for name, anchor in same_device.items():
        placed[name] = placed[anchor]
    return {name: placed[name] for name in sizes}


def device_budgets(max_memory: dict | None = None) -> dict[str, float]:
    """Bytes each device may take: max_memory where given, else free accelerator memory less headroom; cpu last."""
    given = {}
    for key, value in (max_memory or {}).items():
        device = "cpu" if key == "cpu" else normalize_device(key)
        given[device] = float(parse_size(value))
    budgets: dict[str, float] = {}
    kind = _accelerator_type()
    if kind is not None:
        backend = getattr(torch, kind)
        for index in range(backend.device_count()):
            name = f"{kind}:{index}"
            if name in given:
                budgets[name] = given[name]
            elif not given:  # an explicit max_memory without this device leaves it out, as in transformers
                budgets[name] = backend.mem_get_info(index)[0] * (1 - HEADROOM)
    unknown = set(given) - set(budgets) - {"cpu"}
    if unknown:
        raise DeviceMapError(f"max_memory names {sorted(unknown)}, which this machine does not have; devices here: "
                             f"{sorted(budgets) + ['cpu']}")
    # placement runs on a loaded model whose weights already sit in CPU memory: leaving them there costs nothing
    budgets["cpu"] = given.get("cpu", float("inf"))
    return budgets


def _tied_head(model: nn.Module, units: list[str]) -> dict[str, str]:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if embedding is None or head is None:
        return {}
    shared = {t.untyped_storage().data_ptr() for t in _tensors(embedding)} & \
        {t.untyped_storage().data_ptr() for t in _tensors(head)}
    names = {id(m): n for n, m in model.named_modules()}
    emb_name, head_name = names.get(id(embedding)), names.get(id(head))
    if shared and emb_name in units and head_name in units:
        return {head_name: emb_name}  # one set of buffers serves both: keep them together
    return {}


def infer_device_map(model: nn.Module, max_memory: dict | None = None, strategy: str = "auto") -> dict[str, str]:
    """A device_map for this model: whole decoder layers over the accelerators by packed size, the rest on the CPU."""
    units = placement_units(model)
    seen: set = set()
    sizes = {name: module_bytes(model.get_submodule(name), seen) for name in units}
    return plan_placement(sizes, device_budgets(max_memory), strategy, _tied_head(model, units))


def _covering_key(name: str, keys: list[str]) -> str | None:
    best = None
    for key in keys:
        covers = key == "" or name == key or name.startswith(key + ".")
        if covers and (best is None or len(key) > len(best)):
            best = key
    return best


def check_device_map(model: nn.Module, device_map: dict) -> dict[str, str]:
    """Validate a user's {module name: device} map (names exist, every weight covered) and normalise devices."""
    modules = dict(model.named_modules())
    resolved: dict[str, str] = {}
    for key, value in device_map.items():
        if key not in modules:
            parent, _, leaf = key.rpartition(".")
            merged = getattr(modules.get(parent), "_separate_names", ())
            hint = (f"; {parent} merges {', '.join(merged)} into one fused projection, so map {parent} (or its layer) "
                    f"as a whole, or load with optimize_model=False" if leaf in merged else
                    f"; module names look like {', '.join(placement_units(model)[:3])}")
            raise DeviceMapError(f"device_map names {key!r}, which is not a module of {type(model).__name__}{hint}")
        resolved[key] = normalize_device(value)
    keys = list(resolved)
    uncovered = [f"{m}.{n}".lstrip(".") for m, module in modules.items()
                 for n, t in list(module._parameters.items()) + list(module._buffers.items())
                 if t is not None and _covering_key(f"{m}.{n}".lstrip("."), keys) is None]
    if uncovered:
        raise DeviceMapError(f"device_map leaves {len(uncovered)} weights unplaced, e.g. {', '.join(uncovered[:3])}; "
                             f"map their modules too, or add an entry '' for everything else")
    return resolved


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_move(item, device) for item in obj)
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            obj[key] = _move(value, device)  # in place: ModelOutput and kwargs dicts stay what they are
    return obj


def _module_device(module: nn.Module) -> torch.device | None:
    # looked up at every call, so a later model.to() is followed rather than fought
    tensor = next(_tensors(module), None)
    return None if tensor is None else tensor.device


def _inputs_to_module_device(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    device = _module_device(module)
    if device is None:
        return args, kwargs
    return _move(args, device), _move(kwargs, device)


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def dispatch_model(model: nn.Module, device_map: dict[str, str], force_hooks: bool = False) -> nn.Module:
    """Move each mapped module to its device and hook input moves; outputs come back on the caller's device.

    A map with a single device is a plain model.to(device) (no hooks) unless force_hooks is set.
    """
    devices = set(device_map.values())
    model.hf_device_map = dict(device_map)
    if len(devices) == 1 and not force_hooks:
        return model.to(devices.pop())
    disable_graph_decode(model)
    units = set(placement_units(model))
    for name, device in sorted(device_map.items(), key=lambda item: len(item[0])):
        module = model.get_submodule(name) if name else model
        # nn.Module.to, not a bound move_model: modules here are plain transformers / ipex_llm_tf modules
        nn.Module.to(module, device)
        if name:
            module.register_forward_pre_hook(_inputs_to_module_device, with_kwargs=True)
            if name not in units:
                _return_to_caller(module)  # inside a decoder layer: the layer's residual adds expect its device
    _return_to_caller(model)
    return model


def _return_to_caller(module: nn.Module) -> None:
    def remember(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        mod._ipex_llm_tf_caller_device = _first_tensor_device(args, kwargs)

    def give_back(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        device = getattr(mod, "_ipex_llm_tf_caller_device", None)
        return output if device is None else _move(output, device)

    module.register_forward_pre_hook(remember, with_kwargs=True, prepend=True)
    module.register_forward_hook(give_back, with_kwargs=True)


def memory_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per device the model uses: MiB of weights placed there and the peak MiB allocated (process peak RSS on CPU)."""
    weights: dict[str, int] = {}
    seen: set = set()
    for tensor in _tensors(model):
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        device = str(tensor.device)
        weights[device] = weights.get(device, 0) + tensor.numel() * tensor.element_size()
    report = {}
    for device, nbytes in sorted(weights.items()):
        # on the CPU this is the whole process's peak RSS: there is no per-device allocator to ask
        report[device] = {"weights_mib": nbytes / 2**20, "peak_mib": peak_memory_mib(device)}
    return report


def check_device_map_arg(device_map: Any) -> Any:
    """Validate from_pretrained's device_map before any loading: a device, a strategy name or a dict of devices."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        for value in device_map.values():
            normalize_device(value)  # an absent device fails now, not after minutes of loading
        return device_map
    if isinstance(device_map, (str, torch.device, int)) and not isinstance(device_map, bool):
        if str(device_map) in STRATEGIES:
            return str(device_map)
        try:
            return normalize_device(device_map)
        except RuntimeError as err:
            if isinstance(err, DeviceError):
                raise
            raise DeviceMapError(f"device_map={device_map!r} is neither a device ('cpu', 'cuda:0', 0) nor a strategy "
                                 f"{STRATEGIES} nor a dict of module name -> device") from err
    raise DeviceMapError(f"device_map must be a device, one of {STRATEGIES} or a dict, not {type(device_map).__name__}")


def place_model(model: nn.Module, device_map: Any = None, max_memory: dict | None = None) -> nn.Module:
    """Apply from_pretrained's device_map / max_memory to a loaded low-bit model (None: leave it where it is)."""
    if device_map is None and max_memory is None:
        return model
    device_map = check_device_map_arg(device_map)
    if isinstance(device_map, str) and device_map not in STRATEGIES:
        return model.to(device_map)
    if isinstance(device_map, dict):
        resolved = check_device_map(model, device_map)
    else:
        resolved = infer_device_map(model, max_memory, str(device_map or "auto"))
    model = dispatch_model(model, resolved)
    logger.info("placed %s: %s", type(model).__name__,
                ", ".join(f"{d} {r['weights_mib']:.0f} MiB" for d, r in memory_report(model).items()))
    return model
