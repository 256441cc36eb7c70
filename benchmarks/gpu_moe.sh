#!/usr/bin/env bash
# Issue 7 with DP x EP on 2 or 4 GPUs: W1-style throughput of both MoE shapes (256 x 512/256,
# dummy bf16), traced, with the step's GPU time split into attention, dispatch, experts and
# combine (EP runs eagerly). One GPU: benchmarks/gpu_moe1.sh.
# Usage: benchmarks/gpu_moe.sh NUM_GPUS [NUM_PROMPTS]
source benchmarks/gpu_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=$1
prompts=${2:-256}
out=${OUT:-/tmp/out}
mkdir -p "$out"
for shape in deepseek-v2-lite qwen3-30b-a3b; do
  timeout 280 python benchmarks/w1_throughput.py --shape $shape --engines braid-dp$n-ep --num-prompts $prompts \
    --trace-dir /tmp/trace_${shape}_$n --out "$out/w1_${shape}_dp${n}ep.json" 2>&1 | grep -E "floor|braid|rror" | grep -v Warning
  python benchmarks/span_split.py "$out/w1_${shape}_dp${n}ep.json"
done
