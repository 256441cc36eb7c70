#!/usr/bin/env bash
# One GPU session for the fast path: GPU tests, decode step vs floor, W1 vs HF (traced).
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout 200 python -m pytest tests/engine/test_gpu_cuda_graphs.py tests/layers/test_fused_ops.py tests/observe \
  -m gpu -q -p no:cacheprovider 2>&1 | tail -6
timeout 150 python benchmarks/decode_step.py --shape llama3-8b --batch-sizes 1,16,64,256 \
  --out "$out/decode_step_llama3_8b_graphs.json" 2>&1 | tail -6
timeout 330 python benchmarks/w1_throughput.py --engines braid,hf --trace-dir /tmp/w1trace \
  --out "$out/w1_llama3_8b.json" 2>&1 | grep -v Warning | tail -6
python -m braid.entrypoints.cli trace summarize /tmp/w1trace/run0 --top 5 2>&1 | tail -25
