"""Device handling without the devices: absent accelerators give clear errors, and the dispatch layer routes an
"xpu" device string exactly like "cuda" (no CUDA-only branch), checked here with simulated availability."""
from __future__ import annotations

import pytest
import torch

from ipex_llm_tf import kernels
from ipex_llm_tf.devices import DeviceError, available_devices, best_device, check_device, free_random_generator


def test_cpu_always_available() -> None:
    assert available_devices()[-1] == "cpu" and best_device() in ("xpu", "cuda", "cpu")
    assert check_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "xpu", "cuda:3", "xpu:1"])
def test_absent_accelerator_is_a_clear_error(name: str) -> None:
    if getattr(torch, name.split(":")[0]).is_available():
        pytest.skip(f"{name} exists here")
    with pytest.raises(DeviceError, match="not available on this machine.*use device='cpu'"):
        check_device(name)


def test_unknown_device_type() -> None:
    with pytest.raises(DeviceError, match="not supported"):
        check_device("mps")


@pytest.mark.parametrize("device_type", ["cuda", "xpu"])
@pytest.mark.parametrize("has_triton", [True, False])
def test_dispatch_treats_xpu_like_cuda(monkeypatch: pytest.MonkeyPatch, device_type: str, has_triton: bool) -> None:
    monkeypatch.setattr(kernels, "triton_available", lambda: has_triton)
    assert kernels.backend_for(torch.device(device_type)) == ("triton" if has_triton else "torch")
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    assert kernels.backend_for(torch.device(device_type)) == "torch"
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "cpu")
    with pytest.raises(ValueError, match="cannot run a tensor"):
        kernels.backend_for(torch.device(device_type))


def test_kernel_sources_have_inline_ptx_only_behind_the_cuda_switch() -> None:
    """One Triton source must serve CUDA and XPU. The one inline PTX, nf4's warp shuffles, lives in lane_lookup.py,
    and a kernel compiles it only in a branch on its LANES constexpr, which only CUDA sets
    (tests/test_lane_lookup.py): on XPU those lines are never compiled."""
    import re
    from pathlib import Path
    for path in Path(kernels.__file__).parent.glob("*.py"):
        text = path.read_text()
        if path.name != "lane_lookup.py":
            assert "inline_asm" not in text, path.name
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if re.search(r"\blane_(lookup|table|id)\(", line) and not line.lstrip().startswith(("def ", "from ", "#")):
                if path.name == "lane_lookup.py":
                    continue  # the definitions themselves (lane_table calls lane_id)
                headers, indent = [], len(line) - len(line.lstrip())
                for prev in reversed(lines[:i]):  # the headers of the blocks the call sits in, up to its def
                    if prev.strip() and len(prev) - len(prev.lstrip()) < indent:
                        headers.append(prev)
                        indent = len(prev) - len(prev.lstrip())
                        if prev.lstrip().startswith("def "):
                            break
                assert any(re.search(r"\b(el)?if\b.*\bLANES\b", h) for h in headers), \
                    f"{path.name}:{i + 1} outside a LANES branch"


def test_a_freed_generator_keeps_its_seed_and_offset() -> None:
    """free_random_generator swaps the device's default generator (the index given, else the current device's) for
    a fresh state with the same seed and offset; an API without default generators is left alone."""
    from types import SimpleNamespace

    from conftest import _FakeGenerator
    stuck = [_FakeGenerator(seed=7, offset=12, capturing=True), _FakeGenerator(seed=9, offset=4, capturing=True)]
    api = SimpleNamespace(default_generators=stuck, current_device=lambda: 1)
    free_random_generator(api, torch.device("cpu"))  # no index: the current device's, 1
    assert (stuck[1].capturing, stuck[1].seed, stuck[1].offset) == (False, 9, 4) and stuck[0].capturing
    free_random_generator(api, torch.device("cuda", 0))
    assert (stuck[0].capturing, stuck[0].seed, stuck[0].offset) == (False, 7, 12)
    free_random_generator(SimpleNamespace(current_device=lambda: 0), torch.device("cuda", 0))  # nothing to free
