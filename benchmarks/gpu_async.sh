#!/usr/bin/env bash
# One GPU session for async scheduling: GPU tests, decode step sync vs async, W1 sync vs async (traced).
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout 150 python -m pytest tests/engine/test_gpu_cuda_graphs.py -m gpu -q -p no:cacheprovider --tb=short 2>&1 | grep -E "^E |test_gpu_cuda_graphs.py:[0-9]+|passed|failed" | head -24
for mode in sync async; do
  flag=$([ $mode = async ] && echo --async-scheduling)
  timeout 150 python benchmarks/decode_step.py --shape llama3-8b --batch-sizes 1,16,64,256 --steps 40 $flag \
    --out "$out/decode_step_llama3_8b_$mode.json" 2>&1 | tail -5
done
timeout 200 python benchmarks/w1_throughput.py --engines braid,braid-async --trace-dir /tmp/w1trace \
  --out "$out/w1_llama3_8b_async.json" 2>&1 | grep -v Warning | tail -4
for d in /tmp/w1trace/*; do echo "== $d"; python -m braid.entrypoints.cli trace summarize $d --top 3 2>&1 | tail -14; done
