#!/usr/bin/env bash
# Issue 5: braid serve at concurrency 64 (Llama-3-8B shape): baseline vs async vs MS-8; GPU tests first.
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout 150 python -m pytest tests/engine/test_gpu_cuda_graphs.py tests/worker -m "gpu or not gpu" -q \
  -p no:cacheprovider --tb=short 2>&1 | grep -E "^E |\.py:[0-9]+: in|passed|failed" | tail -8
for cfg in "baseline:" "async:--async-scheduling" "ms8:--num-scheduler-steps 8"; do
  tag=${cfg%%:*}; flags=${cfg#*:}
  CONCURRENCY=64 TAG="llama3_8b_c64_$tag" timeout 200 bash benchmarks/serve_sweep.sh llama3-8b "$out" \
    --max-num-seqs 256 $flags 2>&1 | grep -E "Request throughput|Output token|Median TTFT|Median TPOT|Median ITL|P99 ITL|Failed|died|rror" | tail -9
done
