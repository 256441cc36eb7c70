#!/usr/bin/env bash
# Programmatic dependent launch on one H100: the PDL GPU tests (dependent-kernel chain and engine
# tokens bit-equal with PDL off / on / on + weight prefetch), the CUDA-graph tests, then the
# Llama-3-8B decode step with BRAID_PDL=0 / 1 / 2 interleaved over ROUNDS rounds (same lease, so
# the modes compare), JSON under $OUT.   Usage: benchmarks/gpu_pdl.sh [ROUNDS] [tests|notests]
source benchmarks/gpu_setup.sh
rounds=${1:-1}
out=${OUT:-/tmp/out}
mkdir -p "$out"
if [ "${2:-tests}" = tests ]; then
  timeout -s INT 240 python -m pytest tests/layers/test_pdl.py tests/layers/test_skinny_gemm.py \
    tests/engine/test_gpu_cuda_graphs.py -m gpu -v -p no:cacheprovider --tb=short > "$out/gpu_tests_pdl.log" 2>&1
  grep -E "PASSED|FAILED|ERROR|^E |passed|failed|Interrupt" "$out/gpu_tests_pdl.log" | tail -30
fi
for r in $(seq "$rounds"); do
  for mode in ${PDL_MODES:-0 1 2}; do
    BRAID_PDL=$mode timeout 200 python benchmarks/decode_step.py --async-scheduling --repeats 3 \
      --out "$out/decode_step_pdl${mode}_r$r.json" 2>&1 | grep -E "^ +[0-9]+ " | sed "s/^/pdl=$mode r$r /"
  done
done
