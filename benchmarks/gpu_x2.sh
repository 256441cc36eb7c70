#!/usr/bin/env bash
# 2 x H200 calls. Usage: benchmarks/gpu_x2.sh pp70|dbo2
#  pp70: the PP=2 GPU equivalence cases with async/multi-step; W1 on the Llama-3-70B shape, PP=2 with one
#        batch in flight vs two, --max-num-seqs 192 (two micro-batches' KV fit the pool: no preemption), traced.
#  dbo2: DBO off/on/auto step times (the three engines timed round-robin), DeepSeek-V2-Lite shape, DP=2 x EP, over NVLink and with NCCL
#        peer-to-peer off, one after the other (every shape warmed before timing).
#  dboauto2: the DP x EP and DBO GPU tests; then dbo2 with per-step decode timing and auto's start-up
#        tables in logs under $OUT.
#  pp70seqs128: pp70's 1 vs 2 in flight at --max-num-seqs 128 (512 requests = 4 full waves of one batch,
#        2 of two: no half-empty tail wave).
source benchmarks/gpu_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
gpu_tests() {  # the DP x EP and DBO GPU tests (~3 min), each test's outcome in $out/gpu_tests.log
  timeout ${TESTS_TIMEOUT:-240} python -m pytest tests/models/test_gpu_moe_models.py tests/worker/test_ubatching.py \
    -k "dp2 or dbo or traced or stream" -m gpu -v -p no:cacheprovider --tb=short > "$out/gpu_tests.log" 2>&1
  grep -E "PASSED|FAILED|ERROR|^E |passed|failed" "$out/gpu_tests.log" | tail -14
}
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
dboauto2)
  export BRAID_LOG_LEVEL=INFO  # workers log the auto policy's start-up table
  date +%T
  gpu_tests
  for link in nvlink nop2p; do
    date +%T
    [ $link = nop2p ] && export NCCL_P2P_DISABLE=1
    timeout ${DBO_TIMEOUT:-210} python benchmarks/dbo_step.py --dp 2 --interleave \
      --out "$out/dbo_step_dsv2lite_dp2_auto_${link}.json" > "$out/dbo_dp2_${link}.log" 2>&1
    grep -E "ms/step|DBO auto policy|rror" "$out/dbo_dp2_${link}.log" | grep -v Warning | tail -20
  done
  date +%T
  ;;
pp70seqs128)
  date +%T
  [ -n "$WITH_TESTS" ] && gpu_tests && date +%T
  timeout ${W1_TIMEOUT:-560} python benchmarks/w1_throughput.py --shape llama3-70b \
    --engines braid-pp2-inflight1,braid-pp2 --max-num-seqs 128 --trace-dir /tmp/trace70 \
    --out "$out/w1_llama3_70b_2xh200_pp2_seqs128.json" 2>&1 | grep -E "floor|braid|rror" | grep -v Warning | tail -6
  date +%T
  ;;
esac
