#!/usr/bin/env bash
# Set up everything on a fresh machine, then run the whole test suite (CPU). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export HF_HUB_OFFLINE=1
exec "${TOKENPOOL_VENV:-.venv}/bin/python" -m pytest -q "$@"
