#!/usr/bin/env bash
# Short H100 call: the CUDA-graph GPU tests (incl. multi-step's kernel compiled at start-up), then
# where W1's prefill steps go: 16 x 512-token prompts alone and next to 256 decoding requests,
# GPU time by kernel kind against the step's FLOP floor.
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
mkdir -p "$out"
timeout -s INT 150 python -m pytest tests/engine/test_gpu_cuda_graphs.py -m gpu -v -p no:cacheprovider --tb=short \
  > "$out/gpu_tests_issue4.log" 2>&1
grep -E "PASSED|FAILED|ERROR|^E |passed|failed|Interrupt" "$out/gpu_tests_issue4.log" | tail -14
timeout 240 python benchmarks/profile_decode.py --parts prefill --steps 6 \
  --out "$out/profile_prefill_llama3_8b_h100.json" 2>&1 | grep -v Warning | grep -E "prefill|ms  |copy"
