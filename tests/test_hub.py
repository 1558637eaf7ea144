"""push_to_hub uploads a low-bit checkpoint; loading by repo id works from the Hugging Face cache, offline."""
from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from ipex_llm_tf import AutoModelForCausalLM
from ipex_llm_tf.serialization import CheckpointError
from model_factories import tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records the calls and publishes uploads in HF cache layout."""

    calls: list[tuple] = []
    cache: Path

    def __init__(self, token=None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, private=None, exist_ok: bool = False):
        RecordingHub.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id: str, folder_path: str, commit_message: str, revision=None):
        RecordingHub.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        repo = RecordingHub.cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    RecordingHub.cache, RecordingHub.calls = cache, []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("IPEX_LLM_TF_BACKEND", "torch")
    return cache


def test_push_then_load_by_repo_id(offline_hub: Path, tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", load_in_4bit=True)
    url = model.push_to_hub("me/llama-int4", private=True)
    assert url.endswith(COMMIT)
    assert RecordingHub.calls[0] == ("create_repo", "me/llama-int4", True, True)
    assert RecordingHub.calls[1][2] == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.load_low_bit("me/llama-int4", cache_dir=str(offline_hub))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoModelForCausalLM.from_pretrained("me/llama-int4", cache_dir=str(offline_hub)).config.ipex_llm_tf


def test_unknown_repo_offline(offline_hub: Path) -> None:
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        AutoModelForCausalLM.load_low_bit("me/does-not-exist", cache_dir=str(offline_hub))
    with pytest.raises(CheckpointError, match="neither an existing directory nor a Hub repo id"):
        AutoModelForCausalLM.load_low_bit("./no/such/dir")
