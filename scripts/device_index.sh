#!/usr/bin/env bash
# One device-tool call: the index's GPU tests, then bench/gpu_fastplaid.py (FastPlaid against tokenpool's residual
# codec, both candidate paths, an index of one segment and of eight). FastPlaid is installed from wheels carried in
# .fpwheels (fast-plaid built for torch 2.11 and its pure-Python dependencies: `pip download
# fast-plaid==1.7.0.2110 --no-deps` and its requirements).
#   run(command="bash scripts/device_index.sh", carry=[".fpwheels"])
# Environment: TESTS (pytest arguments; "none" skips the tests), ARGS (bench/gpu_fastplaid.py's).
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) CPUs"
pip install -q --no-deps --target /tmp/fp .fpwheels/*.whl >/dev/null 2>&1 \
    || echo "fast-plaid did not install"
export PYTHONPATH=$PYTHONPATH:/tmp/fp
if [[ ${TESTS:-} != none ]]; then
    timeout 200 python -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_gpu_maxsim.py tests/test_index_residual.py \
        -k "cuda or pair or fixed_shape or candidate"} 2>&1 | tail -3
fi
timeout 400 python bench/gpu_fastplaid.py ${ARGS:---docs 200000 --queries 1000 --single 50 --tp-nbits 2 \
    --tp-paths dense,pairs --tp-segments 1,8 --noise 0.8} 2>&1 | grep -v -i warn | tail -30
exit 0
