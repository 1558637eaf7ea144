"""The Hugging Face Hub: resolve a repo id to a local snapshot (cache first) and push low-bit checkpoints."""
from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from .serialization import CheckpointError

# What a model directory needs; pickles are deliberately absent so they are never fetched implicitly.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def resolve_checkpoint_dir(path_or_repo: "str | Path", revision: str | None = None, cache_dir: str | None = None,
                           token: "str | bool | None" = None, local_files_only: bool = False) -> Path:
    """A local directory as is, else a Hub repo id downloaded (or found in the HF cache when offline)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.suffix in (".safetensors", ".gguf", ".bin") or path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds it (or use from_gguf for .gguf)")
    repo_id = str(path_or_repo)
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/")):
        raise CheckpointError(f"{repo_id} is neither an existing directory nor a Hub repo id ('owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                      local_files_only=local_files_only, allow_patterns=SNAPSHOT_PATTERNS))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(f"{repo_id}: not a local directory, not in the Hugging Face cache, and the Hub could "
                              f"not be reached ({err.__class__.__name__}); check the path or go online once") from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise CheckpointError(f"{repo_id}: could not be fetched from the Hub: {err}") from err


def push_low_bit_to_hub(model: nn.Module, repo_id: str, tokenizer=None, private: bool | None = None,
                        token: "str | bool | None" = None, commit_message: str = "Upload low-bit model (ipex_llm_tf)",
                        revision: str | None = None, max_shard_size: "int | str" = "5GB", **unused) -> str:
    """Save the low-bit checkpoint to a temporary directory and upload it to `repo_id`; returns the commit URL."""
    if unused:
        raise TypeError(f"push_to_hub got unsupported arguments {sorted(unused)}")
    from huggingface_hub import HfApi
    from .optimize import save_low_bit
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="ipex-llm-tf-push-") as tmp:
        folder = save_low_bit(model, Path(tmp) / "model", tokenizer=tokenizer, max_shard_size=max_shard_size)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision)
    return str(getattr(info, "commit_url", info))
