#!/usr/bin/env bash
# Issue 5 on one GPU: GPU tests, then the RFC's table (baseline, MS-8, MS-16, async, async + MS-8)
# on W1 (Llama-3-8B shape) and on the CPU-bound W-small (SmolLM2-135M shape), traced for GPU busy.
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
variants=braid,braid-ms8,braid-ms16,braid-async,braid-async-ms8
timeout 170 python -m pytest tests/engine/test_gpu_cuda_graphs.py tests/worker -m "gpu or not gpu" -q \
  -p no:cacheprovider --tb=short 2>&1 | grep -E "^E |\.py:[0-9]+: in|passed|failed" | head -12
timeout 260 python benchmarks/w1_throughput.py --engines $variants --trace-dir /tmp/w1ms \
  --out "$out/w1_llama3_8b_multistep.json" 2>&1 | grep -v Warning | tail -6
timeout 150 python benchmarks/w1_throughput.py --shape smollm2-135m --num-prompts 1024 --input-len 128 \
  --output-len 256 --engines $variants --trace-dir /tmp/wsmall \
  --out "$out/wsmall_smollm2_multistep.json" 2>&1 | grep -v Warning | tail -6
