#!/usr/bin/env bash
# Short H100 call: fused-op and CUDA-graph GPU tests, then the decode step (async scheduling).
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout 120 python -m pytest tests/layers/test_fused_ops.py tests/engine/test_gpu_cuda_graphs.py -m gpu -q \
  -p no:cacheprovider --tb=short 2>&1 | grep -E "^E |\.py:[0-9]+: in|passed|failed" | head -12
timeout 150 python benchmarks/decode_step.py --shape llama3-8b --batch-sizes 1,16,64,256 --steps 30 --repeats 3 \
  --async-scheduling --out "$out/decode_step_llama3_8b_h100_async_rope_cache.json" 2>&1 | tail -5
