#!/usr/bin/env bash
# Install everything into .venv and run the test suite (GPU tests skip themselves without a GPU). Given no arguments
# on a machine without a GPU, it then runs the quicker Triton kernel tests on the CPU through Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -rs "$@"
fi
.venv/bin/python -m pytest -q -rs
if .venv/bin/python -c "import sys, torch; sys.exit(torch.cuda.is_available() or (hasattr(torch, 'xpu') and torch.xpu.is_available()))"; then
  # The kernels against the same PyTorch references as on a GPU, minus the slowest cases there (the whole of
  # tests/gpu takes ~40 minutes interpreted on 2 cores; these ~2)
  TRITON_INTERPRET=1 exec .venv/bin/python -m pytest -q -rs tests/gpu -k "not test_linear_matches_reference and \
not test_configs and not test_subnormal_codes and not (test_gated_gemv_equals_gemv_then_silu_and_mul and not \
sym_int4 and not nf3)"
fi
