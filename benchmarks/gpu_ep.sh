#!/usr/bin/env bash
# Issues 7/8 on 4 GPUs. Usage: benchmarks/gpu_ep.sh w1|dbo
#  w1:  GPU DP x EP equivalence tests, then W1-style throughput (256 x 512/256) of both MoE shapes
#       with DP=2 x EP (the two shapes side by side on GPUs 0,1 and 2,3) and DP=4 x EP, traced.
#  dbo: DBO off/on step times, DeepSeek-V2-Lite shape, DP=2 x EP over NVLink (GPUs 0,1) and
#       with NCCL peer-to-peer off (GPUs 2,3), side by side.
source benchmarks/gpu_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
w1() {  # shape, dp size, engine suffix, prompts
  timeout ${W1_TIMEOUT:-200} python benchmarks/w1_throughput.py --shape $1 --engines braid-dp$2-ep$3 --num-prompts $4 \
    --trace-dir /tmp/trace_$1_$2$3 --out "$out/w1_$1_dp$2ep$3.json" > /tmp/log_$1_$2$3 2>&1
  grep -E "floor|braid|rror" /tmp/log_$1_$2$3 | grep -v Warning | tail -3
  python benchmarks/span_split.py "$out/w1_$1_dp$2ep$3.json"
}
case $1 in
w1)
  timeout 200 python -m pytest tests/models/test_gpu_moe_models.py -k dp2 -m gpu -q -p no:cacheprovider --tb=short \
    2>&1 | grep -E "^E |Error|passed|failed" | tail -8
  CUDA_VISIBLE_DEVICES=0,1 w1 deepseek-v2-lite 2 "" 256 > /tmp/a.txt &
  CUDA_VISIBLE_DEVICES=2,3 w1 qwen3-30b-a3b 2 "" 256 > /tmp/b.txt &
  wait; cat /tmp/a.txt /tmp/b.txt
  w1 deepseek-v2-lite 4 "" 256
  w1 qwen3-30b-a3b 4 "" 256
  ;;
dbo)
  CUDA_VISIBLE_DEVICES=0,1 timeout 280 python benchmarks/dbo_step.py --dp 2 --out "$out/dbo_step_dsv2lite_dp2_nvlink.json" \
    > /tmp/dbo_a.txt 2>&1 &
  CUDA_VISIBLE_DEVICES=2,3 NCCL_P2P_DISABLE=1 timeout 280 python benchmarks/dbo_step.py --dp 2 \
    --out "$out/dbo_step_dsv2lite_dp2_nop2p.json" > /tmp/dbo_b.txt 2>&1 &
  wait
  for f in /tmp/dbo_a.txt /tmp/dbo_b.txt; do echo "== $f"; grep -E "ms/step|ERROR|Error" $f | tail -12; done
  ;;
esac
