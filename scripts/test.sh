#!/usr/bin/env bash
# Set up everything on a fresh machine, then run the whole test suite (CPU). Extra args go to pytest
# (and then only that pytest run happens).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export HF_HUB_OFFLINE=1
PY="${TOKENPOOL_VENV:-.venv}/bin/python"
if [ $# -gt 0 ]; then
  exec "$PY" -m pytest -q "$@"
fi
"$PY" -m pytest -q
# The AVX2 class's code paths (AMD Zen 3 and older: no AVX-512, no native bf16) on whatever CPU this is:
# PyTorch, oneDNN and MKL capped at AVX2, the model tests in bf16 (emulated there) against fp32 references.
echo "== the same models with the CPU capped at AVX2, bf16 =="
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 TOKENPOOL_TEST_DTYPE=bfloat16 \
  "$PY" -m pytest -q tests/test_minilm.py tests/test_bge_m3.py tests/test_batch_invariance.py tests/test_qwen2_5_vl.py \
  tests/test_modernbert.py tests/test_colbert.py tests/test_index.py tests/test_index_kernel.py
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
  "$PY" -m pytest -q tests/test_index_residual.py -k "not recall"
# The Triton kernels (CUDA attention, the index's MaxSim and candidate stages) on the CPU under Triton's
# interpreter: their logic against the torch references without a GPU (a GPU runs them compiled: README).
echo "== the Triton kernels under Triton's interpreter =="
TRITON_INTERPRET=1 "$PY" -m pytest -q tests/test_triton_attention.py tests/test_gpu_maxsim.py \
  tests/test_index_residual.py -k "not recall"
