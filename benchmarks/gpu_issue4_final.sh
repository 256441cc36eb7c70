#!/usr/bin/env bash
# Short H100 call: fused-op and CUDA-graph GPU tests (incl. no mid-run Triton compile), the decode step
# (async scheduling), then W1.
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout -s INT 150 python -m pytest tests/layers/test_fused_ops.py tests/engine/test_gpu_cuda_graphs.py tests/worker -m gpu -q \
  -p no:cacheprovider --tb=short 2>&1 | grep -E "^E |\.py:[0-9]+: in|passed|failed|Interrupt" | head -12
timeout 150 python benchmarks/decode_step.py --shape llama3-8b --batch-sizes 1,16,64,256 --steps 30 --repeats 3 \
  --async-scheduling --out "$out/decode_step_llama3_8b_h100_async_${W1_TAG:-latest}.json" 2>&1 | tail -5
# W1 with 3 repeats (compare the first repeat's elapsed with the other two: no mid-run compiles).
timeout 240 python benchmarks/w1_throughput.py --engines braid-async --repeats 3 --trace-dir /tmp/w1trace \
  --out "$out/w1_llama3_8b_h100_async_${W1_TAG:-latest}.json" 2>&1 | grep -E "floor|braid" | tail -5
