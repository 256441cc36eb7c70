#!/usr/bin/env bash
# braid serve at concurrency 1-256 (Llama-3-8B shape, async scheduling), traced: the p99 ITL of the
# sweep (0.5-0.65 s) is a stall every stream sees at once; the trace says what the engine did then.
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
rm -rf /tmp/trserve
CONCURRENCY=${CONCURRENCY:-1,16,64,256} TAG=llama3_8b_async_traced timeout 280 bash benchmarks/serve_sweep.sh llama3-8b "$out" \
  --max-num-seqs 256 --async-scheduling --trace-dir /tmp/trserve 2>&1 | grep -E "Request throughput|Median TPOT|P99 ITL|Failed|died|rror"
python -m braid.entrypoints.cli trace summarize /tmp/trserve 2>&1 | head -70
tar czf "$out/trserve.tgz" -C /tmp trserve && ls -la "$out/trserve.tgz"
