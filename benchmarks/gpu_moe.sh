#!/usr/bin/env bash
# Issue 7 on GPUs: MoE GPU tests, the fused-experts kernel against its floor, then W1-style
# throughput of the MoE shapes on one GPU and with DP x EP over the GPUs given (2 or 4).
# Usage: benchmarks/gpu_moe.sh [NUM_GPUS]
source benchmarks/gpu_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=${1:-1}
out=${OUT:-/tmp/out}
mkdir -p "$out"
timeout 200 python -m pytest tests/models/test_gpu_moe_models.py tests/layers/moe -m "gpu or not gpu" -q \
  -p no:cacheprovider --tb=short 2>&1 | grep -E "^E |Error|passed|failed" | tail -8
timeout 150 python benchmarks/moe_kernel.py --out "$out/moe_kernel.json" 2>&1 | tail -14
engines=braid
[ "$n" -ge 2 ] && engines=$engines,braid-dp2-ep
[ "$n" -ge 4 ] && engines=$engines,braid-dp4-ep
for shape in deepseek-v2-lite qwen3-30b-a3b; do
  timeout 600 python benchmarks/w1_throughput.py --shape $shape --engines $engines --num-prompts 256 \
    --out "$out/w1_${shape}_${n}gpu.json" 2>&1 | grep -E "floor|braid|rror" | grep -v Warning
done
