#!/usr/bin/env bash
# One device-tool call: the engine pipeline's GPU tests, then bench/gpu_pipeline.py per shape and setting.
#   run(command="bash scripts/device_pipeline.sh")
# Environment: SHAPES (default "modernbert minilm"), VARIANTS (space-separated VAR=value settings, one run
# each per shape; default TOKENPOOL_COPY_THREADS=1 and =4), TESTS (pytest arguments; "none" skips the tests).
set -u
export PYTHONPATH=$PWD:$(ls -d $PWD/.venv/lib/python3*/site-packages 2>/dev/null | head -1) HF_HUB_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) CPUs"
if [[ ${TESTS:-} != none ]]; then
    TOKENPOOL_TEST_DEVICE=cuda TOKENPOOL_TEST_DTYPE=bfloat16 timeout 150 python -m pytest -q -p no:cacheprovider \
        ${TESTS:-tests/test_batch_invariance.py tests/test_gpu_maxsim.py -k "in_flight or staging or inflight or index_on_cuda"} \
        2>&1 | tail -3
fi
for shape in ${SHAPES:-modernbert minilm}; do
    for variant in ${VARIANTS:-TOKENPOOL_COPY_THREADS=1 TOKENPOOL_COPY_THREADS=4}; do
        echo "== $shape, $variant"
        env $variant timeout 120 python bench/gpu_pipeline.py --shape $shape 2>&1 | grep -v -i warn | tail -12
    done
done
exit 0
