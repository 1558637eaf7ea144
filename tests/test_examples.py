"""Every script in examples/ runs to the end on SmolLM2 with a tiny token budget and prints what it promises."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipex_llm_tf.gguf_import import find_default_gguf

pytestmark = pytest.mark.slow  # each script loads (and most re-quantize) SmolLM2: ~30-60 s apiece on two cores

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    try:
        find_default_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    cache = tmp_path_factory.mktemp("ipex-llm-tf-cache")  # shared, so nothing lands in the user's own cache
    return {**os.environ, "IPEX_LLM_TF_CACHE": str(cache), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def run_example(env: dict[str, str], name: str, *args: str) -> str:
    """stdout of `python examples/NAME --max-new-tokens 4 ARGS`, asserting it exits 0."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--max-new-tokens", "4", *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_transformers_api(example_env):
    out = run_example(example_env, "transformers_api.py")
    assert "streaming (sym_int4 on " in out and "reloaded: '" in out
    assert "identical: True" in out  # the saved packed weights reload bit for bit


def test_optimize_model(example_env):
    out = run_example(example_env, "optimize_model.py")
    lines = dict(line.split(":", 1) for line in out.splitlines() if line.startswith(("optimized:", "reloaded:")))
    assert lines["optimized"].strip() == lines["reloaded"].strip() != "''"


def test_gguf_model(example_env):
    out = run_example(example_env, "gguf_model.py")
    assert "low_bit: asym_int4; layers per format: {'asym_int4': " in out  # only Q4_1 blocks in the file


def test_hub_dry_run(example_env):
    out = run_example(example_env, "hub.py", "--dry-run", "--repo-id", "me/smollm2-asym_int4")
    assert "would upload to https://huggingface.co/me/smollm2-asym_int4" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert f"  {name} " in out
    assert "loaded " in out
