#!/usr/bin/env bash
# One device-tool call: the Triton attention kernel's tests and its benchmark against FlashAttention-2, then
# end to end ModernBERT-base / BGE-M3 / MiniLM shapes with each attention kernel (bench/NOTES.md).
#   run(command="bash scripts/device_attention.sh [tests,kernel,e2e]")
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1
STAGES=",${1:-tests,kernel,e2e},"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[[ $STAGES == *,tests,* ]] && TOKENPOOL_TEST_DEVICE=cuda TOKENPOOL_TEST_DTYPE=bfloat16 timeout 240 python -m pytest -q \
    -p no:cacheprovider tests/test_triton_attention.py tests/test_modernbert.py tests/test_bge_m3.py \
    tests/test_gpu_kernels.py tests/test_batch_invariance.py 2>&1 | tail -6
[[ $STAGES == *,kernel,* ]] && timeout 150 python bench/gpu_attention.py 2>&1 | tail -45
if [[ $STAGES == *,e2e,* ]]; then
    for shape in ${SHAPES:-modernbert bge-m3}; do
        for kernel in flash triton; do
            echo "== $shape, TOKENPOOL_CUDA_ATTENTION=$kernel"
            TOKENPOOL_CUDA_ATTENTION=$kernel timeout 150 python bench/gpu_token_embed.py --shape $shape --skip-hf 2>&1 \
                | grep -v Warning | tail -4
        done
    done
fi
