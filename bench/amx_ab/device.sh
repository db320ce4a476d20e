#!/usr/bin/env bash
# One device-tool call on the GPU machine's host CPU (16-core Intel Xeon, AMX): the AMX kernel tests on real
# tiles, then bench/amx_ab/ab.py (2 cores under taskset, then 16) and bench/index_scan.py end to end.
#   git show <rev>:tokenpool/kernels/maxsim.c > bench/amx_ab/base.c    (here, before the call: the baseline)
#   run(command="bash bench/amx_ab/device.sh", carry=["bench/amx_ab/base.c"])   (base.c is git-ignored)
# Environment: VARIANTS (scan_ab.c's, default none), DATA (ab.py's --data, default numpy).
set -u
export PYTHONPATH=$PWD TOKENPOOL_CACHE_DIR=/tmp/tpk
BASE=()
[[ -f bench/amx_ab/base.c ]] && BASE=(--baseline base=bench/amx_ab/base.c)
AB=(bench/amx_ab/ab.py "${BASE[@]}" --data "${DATA:-numpy}" --variants ${VARIANTS:-})
echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) CPUs; $(date -u)"
timeout 100 python -m pytest -q -p no:cacheprovider tests/test_index_kernel.py tests/test_cpu_kernels.py 2>&1 | tail -2
timeout 120 taskset -c 0,1 python "${AB[@]}" --threads 2 2>&1 | grep -v 'vs new 0$'
timeout 60 taskset -c 0,1 python "${AB[@]}" --threads 2 --codec float32 --queries 1 2>&1 | grep -v 'vs new 0$'
timeout 60 python "${AB[@]}" --threads 16 --reps 15 2>&1 | grep -v 'vs new 0$'
timeout 90 taskset -c 0,1 python bench/index_scan.py --threads 2 --codec float16 float32 2>&1 | tail -7
timeout 60 python bench/index_scan.py --threads 16 --codec float16 float32 2>&1 | tail -7
exit 0
