"""device_map over 2 CUDA GPUs (and the CPU): layers land where the map says and generation is unchanged.

Skipped unless this machine has at least 2 CUDA devices. The CPU-only checks are in tests/test_distributed.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tp_worker  # noqa: E402
from model_factories import tiny_model  # noqa: E402

from ipex_llm_tf import AutoModelForCausalLM, optimize_model  # noqa: E402
from ipex_llm_tf.distributed import memory_report  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")

# Spread over GPUs: the same Triton kernels on the same float32 inputs as the single-GPU reference, so only reduction
# order may differ. With CPU offload both models run the exact float32 reference (IPEX_LLM_TF_BACKEND=torch): the
# CPU's int4 kernel takes bf16 activations, which can flip a near-tie in greedy tokens on a random tiny model.
LOGIT_ATOL = 1e-4


@pytest.mark.parametrize("placement", ["auto", "offload"])
def test_layers_spread_over_two_gpus(tmp_path: Path, placement: str, monkeypatch: pytest.MonkeyPatch) -> None:
    optimize_model(tiny_model("llama"), low_bit="sym_int4").save_low_bit(tmp_path)
    if placement == "auto":
        model = AutoModelForCausalLM.load_low_bit(tmp_path, device_map="auto")
        assert set(model.hf_device_map.values()) == {"cuda:0", "cuda:1"}
    else:  # budgets too small for the whole model: fill GPU 0, then GPU 1, the rest on the CPU
        monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
        model = AutoModelForCausalLM.load_low_bit(tmp_path, device_map="sequential",
                                                  max_memory={0: "40KiB", 1: "40KiB", "cpu": "1GiB"})
        assert {"cuda:0", "cpu"} <= set(model.hf_device_map.values())
    single = tp_worker.greedy(AutoModelForCausalLM.load_low_bit(tmp_path).to("cuda:0"))
    spread = tp_worker.greedy(model)
    assert torch.equal(spread["tokens"], single["tokens"])
    err = (spread["logits"] - single["logits"]).abs().max().item()
    assert err <= LOGIT_ATOL, f"max |logit diff| {err:.3g}"
    report = memory_report(model)
    assert all(report[device]["weights_mib"] > 0 for device in set(model.hf_device_map.values()))
