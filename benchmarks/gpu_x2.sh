#!/usr/bin/env bash
# 2 x H200 calls. Usage: benchmarks/gpu_x2.sh pp70|dbo2
#  pp70: the PP=2 GPU equivalence cases with async/multi-step; W1 on the Llama-3-70B shape, PP=2 with one
#        batch in flight vs two, --max-num-seqs 192 (two micro-batches' KV fit the pool: no preemption), traced.
#  dbo2: DBO off/on/auto step times (the three engines timed round-robin), DeepSeek-V2-Lite shape, DP=2 x EP, over NVLink and with NCCL
#        peer-to-peer off, one after the other (every shape warmed before timing).
source benchmarks/gpu_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
case $1 in
pp70)
  timeout 150 python -m pytest tests/distributed/test_gpu_parallel.py -k "pp2-async" -m gpu -q -p no:cacheprovider \
    --tb=short 2>&1 | grep -E "^E |Error|passed|failed|skipped" | tail -8
  timeout 400 python benchmarks/w1_throughput.py --shape llama3-70b --engines braid-pp2-inflight1,braid-pp2 \
    --max-num-seqs 192 --trace-dir /tmp/trace70 --out "$out/w1_llama3_70b_2xh200_pp2_seqs192.json" 2>&1 \
    | grep -E "floor|braid|rror" | grep -v Warning | tail -6
  ;;
dbo2)
  timeout 270 python benchmarks/dbo_step.py --dp 2 --repeats 3 --interleave \
    --out "$out/dbo_step_dsv2lite_dp2_nvlink_interleaved.json" 2>&1 | grep -E "ms/step|ERROR|Error|overlap"
  NCCL_P2P_DISABLE=1 timeout 270 python benchmarks/dbo_step.py --dp 2 --repeats 3 --interleave \
    --out "$out/dbo_step_dsv2lite_dp2_nop2p_interleaved.json" 2>&1 | grep -E "ms/step|ERROR|Error|overlap"
  ;;
esac
