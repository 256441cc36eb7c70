#!/usr/bin/env bash
# One H100 call: decode-size GEMMs (cuBLAS vs Triton skinny GEMM) and a decode-step kernel profile.
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout 340 python benchmarks/skinny_gemm.py --out "$out/skinny_gemm_llama3_8b.json" 2>&1 | grep -v Warning
timeout 220 python benchmarks/profile_decode.py --parts engine --batches 1,64,256 --steps 10 \
  --out "$out/profile_decode_llama3_8b.json" 2>&1 | grep -v Warning | tail -60
