"""Tensor parallelism over NCCL on 2 CUDA GPUs: every rank's greedy output equals the single-GPU model's.

Skipped unless this machine has at least 2 CUDA devices. The CPU (gloo) twin is tests/test_distributed.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tp_worker  # noqa: E402
from model_factories import tiny_model  # noqa: E402

from ipex_llm_tf import AutoModelForCausalLM, optimize_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")

# backend "torch": exact float32 on every rank, only the order of the row-parallel sums differs (as on gloo);
# backend "auto": the Triton kernels, whose split-K and per-rank reductions round differently in float32
CASES = [("llama-sym_int4-torch", "llama", "sym_int4", "torch", 1e-4),
         ("qwen2-sym_int4-triton", "qwen2", "sym_int4", "auto", 2e-3),
         ("llama-fp8-triton", "llama", "fp8_e4m3", "auto", 2e-3)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    root = tmp_path_factory.mktemp("nccl")
    spec = []
    for name, arch, low_bit, backend, _ in CASES:
        optimize_model(tiny_model(arch), low_bit=low_bit).save_low_bit(root / name)
        spec.append({"name": name, "path": str(root / name), "mode": "load", "optimize": True, "device": "cuda",
                     "backend": backend})
    (root / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(tp_worker.__file__)), str(root / "spec.json"), str(root)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    out = {}
    for name, _, _, backend, _ in CASES:
        os.environ["IPEX_LLM_TF_BACKEND"] = backend
        try:
            single = tp_worker.greedy(AutoModelForCausalLM.load_low_bit(root / name).to("cuda"))
        finally:
            os.environ.pop("IPEX_LLM_TF_BACKEND")
        out[name] = (torch.load(root / f"{name}.pt"), single)
    return out


@pytest.mark.parametrize(("name", "tolerance"), [(c[0], c[4]) for c in CASES], ids=[c[0] for c in CASES])
def test_two_gpus_match_one(results, name: str, tolerance: float) -> None:
    ranks, single = results[name]
    assert torch.equal(ranks["tokens"], single["tokens"])
    err = (ranks["logits"] - single["logits"]).abs().max().item()
    assert err <= tolerance, f"max |logit diff| {err:.3g} > {tolerance}"
    assert ranks["o_proj_in"] == 32 and ranks["save_refused"] and not ranks["graph_decode"]
