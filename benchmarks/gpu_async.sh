#!/usr/bin/env bash
# One GPU session for async scheduling: GPU tests, decode step sync vs async, W1 sync vs async (traced).
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout 150 python -m pytest tests/engine/test_gpu_cuda_graphs.py tests/layers/attention -m gpu -q -p no:cacheprovider \
  --tb=short 2>&1 | grep -E "^E |\.py:[0-9]+: in|passed|failed" | head -24
for mode in sync async; do
  flag=$([ $mode = async ] && echo --async-scheduling)
  timeout 200 python benchmarks/decode_step.py --shape llama3-8b --batch-sizes 1,16,64,256 --steps 30 --repeats 3 \
    $flag --out "$out/decode_step_llama3_8b_$mode.json" 2>&1 | tail -5
done
timeout 200 python benchmarks/w1_throughput.py --engines braid-async --repeats 3 --trace-dir /tmp/w1trace \
  --out "$out/w1_llama3_8b_async.json" 2>&1 | grep -v Warning | tail -4
timeout 90 python benchmarks/w1_throughput.py --engines braid --trace-dir /tmp/w1trace \
  --out "$out/w1_llama3_8b_sync.json" 2>&1 | grep -v Warning | tail -2
python -m braid.entrypoints.cli trace summarize /tmp/w1trace/braid-async-run0 --top 3 2>&1 | tail -14
