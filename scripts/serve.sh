#!/usr/bin/env bash
# Set up everything on a fresh machine (no network needed beyond the package index), then serve the
# built-in default model (all-MiniLM-L6-v2) on http://127.0.0.1:8000. Extra args go to `tokenpool serve`,
# e.g. scripts/serve.sh /path/to/bge-m3 --host 0.0.0.0 --port 8000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${TOKENPOOL_VENV:-.venv}/bin/tokenpool" serve "$@"
