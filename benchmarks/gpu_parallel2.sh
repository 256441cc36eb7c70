#!/usr/bin/env bash
# Issue 6 on 2 GPUs: engine TP/PP tests over NCCL, then W1 (Llama-3-8B shape) with TP=2 and PP=2.
source benchmarks/gpu_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:-$OUT}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python -m pytest tests/distributed/test_engine_parallel.py -k "not smollm2" -q -p no:cacheprovider \
  --tb=short 2>&1 | grep -E "^E |\.py:[0-9]+: in|passed|failed" | tail -10
timeout 330 python benchmarks/w1_throughput.py --engines braid-tp2-async,braid-pp2-async,braid-pp2 \
  --out "$out/w1_llama3_8b_2gpu.json" 2>&1 | grep -v Warning | tail -5
