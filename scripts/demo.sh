#!/usr/bin/env bash
# Install everything into .venv, then stream an answer from the embedded SmolLM2-135M-Instruct, quantized.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/ipex-llm-tf generate "${1:-Explain in two sentences why the sky is blue.}" --max-new-tokens 96
