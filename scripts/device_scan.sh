#!/usr/bin/env bash
# One device-tool call on the GPU machine's host CPU (16-core Intel Xeon, AMX): bench/index_scan.py (the exact
# CPU scan against the memory bandwidth measured in the same run) with all 16 cores, then pinned to 2
# (taskset, 2 threads), the class's numbers for issue 13's CPU goal.
#   run(command="bash scripts/device_scan.sh")
# Environment: ARGS (bench/index_scan.py's; default float16 and float32, 1 and 8 queries).
set -u
export PYTHONPATH=$PWD
echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) CPUs, $(grep -o -m1 'amx_bf16' /proc/cpuinfo)"
timeout 280 python bench/index_scan.py --threads 16 ${ARGS:---codec float16 float32} 2>&1 | tail -8
timeout 280 taskset -c 0,1 python bench/index_scan.py --threads 2 ${ARGS:---codec float16 float32} 2>&1 | tail -8
exit 0
