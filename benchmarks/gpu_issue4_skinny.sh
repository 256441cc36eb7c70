#!/usr/bin/env bash
# H100 call for issue 4 with the skinny GEMM: GPU tests, decode step (skinny GEMM on, or each of
# SKINNY="1 0"), a kernel profile, and W1 async (traced, 3 runs).
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout 150 python -m pytest tests/layers/test_skinny_gemm.py tests/layers/test_fused_ops.py \
  tests/engine/test_gpu_cuda_graphs.py -m gpu -q -p no:cacheprovider --tb=short 2>&1 \
  | grep -E "^E |\.py:[0-9]+: in|passed|failed" | head -24
for skinny in ${SKINNY:-1}; do
  BRAID_SKINNY_GEMM=$skinny timeout 170 python benchmarks/decode_step.py --shape llama3-8b --batch-sizes 1,16,64,256 \
    --steps 30 --repeats 3 --async-scheduling --out "$out/decode_step_llama3_8b_h100_async_skinny$skinny.json" 2>&1 | tail -5
done
[ "${PROFILE:-1}" = 1 ] && timeout 120 python benchmarks/profile_decode.py --parts engine --batches 1,16,64 --steps 10 \
  --out "$out/profile_decode_llama3_8b_skinny.json" 2>&1 | grep -v Warning | grep -E "engine|first" 
timeout 240 python benchmarks/w1_throughput.py --engines braid-async --repeats 3 --trace-dir /tmp/w1trace \
  --out "$out/w1_llama3_8b_h100_async_skinny.json" 2>&1 | grep -v Warning | tail -4
python -m braid.entrypoints.cli trace summarize /tmp/w1trace/braid-async-run0 --top 3 2>&1 | tail -14
