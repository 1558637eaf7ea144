"""Device handling without the devices: absent accelerators give clear errors, and the dispatch layer routes an
"xpu" device string exactly like "cuda" (no CUDA-only branch), checked here with simulated availability."""
from __future__ import annotations

import pytest
import torch

from ipex_llm_tf import kernels
from ipex_llm_tf.devices import DeviceError, available_devices, best_device, check_device


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


def test_kernel_sources_have_no_inline_ptx() -> None:
    # one Triton source must serve CUDA and XPU: inline PTX would tie a kernel to NVIDIA
    from pathlib import Path
    for path in Path(kernels.__file__).parent.glob("*.py"):
        assert "inline_asm" not in path.read_text(), path.name
