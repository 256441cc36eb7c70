#!/usr/bin/env bash
# Issues 7/8 on 4 GPUs. Usage: benchmarks/gpu_ep.sh w1|w1dp2|dbo|dbo4
#  w1:  GPU DP x EP equivalence tests, then W1-style throughput (256 x 512/256) of both MoE shapes
#       with DP=2 x EP (the two shapes side by side on GPUs 0,1 and 2,3) and DP=4 x EP, traced.
#  w1dp2 (2 GPUs): DP=2 x EP W1-style with async and multi-step scheduling.
#  dbo4: DBO off/on/auto with DP=4 x EP; dense Llama-3-70B TP=4 prefill off vs on.
#  dboauto4: DP=4 x EP auto vs off/on (per-step decode timing) over NVLink, then with P2P off.
#  dbo256nop2p: DP=4 x EP with P2P off, decode 256 only, 10 repeats.
#  dbo70auto: dense Llama-3-70B TP=4 prefill 4096, off / on / auto, NVLink then P2P off.
#  dboauto: auto vs off/on at decode 64/128/256 and prefill 4096, interleaved: DP=4 x EP over NVLink, then
#       DP=2 x EP over NVLink (GPUs 0,1) and with peer-to-peer off (GPUs 2,3) side by side; logs (with auto's
#       start-up table) under $OUT.
#  dbo: DBO GPU tests; DBO off/on/auto step times, DeepSeek-V2-Lite shape, DP=2 x EP over
#       NVLink (GPUs 0,1) and with NCCL peer-to-peer off (GPUs 2,3), side by side; a traced run.
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
w1dp2)
  # 2 GPUs: DP=2 x EP W1-style runs, plain, async, async + multi-step 8 (the DP core's host work
  # is serial over replicas: these hide it behind the GPU).
  timeout 120 python -m pytest tests/models/test_gpu_moe_models.py -k dp2 -m gpu -q -p no:cacheprovider --tb=short \
    2>&1 | grep -E "^E |Error|passed|failed" | tail -8
  for v in "" "-async" "-async-ms8"; do w1 deepseek-v2-lite 2 "$v" 256; done
  ;;
dbo)
  # GPUs 0,1: NVLink, off / on / auto, then a traced DBO run for the overlap figure.
  ( CUDA_VISIBLE_DEVICES=0,1 timeout 230 python benchmarks/dbo_step.py --dp 2 --repeats 2 \
      --out "$out/dbo_step_dsv2lite_dp2_nvlink.json" > /tmp/dbo_a.txt 2>&1
    CUDA_VISIBLE_DEVICES=0,1 timeout 75 python benchmarks/dbo_step.py --dp 2 --modes on --decode 128 --repeats 1 \
      --steps 8 --trace-dir /tmp/trace_dbo --out "$out/dbo_trace_dsv2lite_dp2_nvlink.json" > /tmp/dbo_t.txt 2>&1 ) &
  # GPUs 2,3: the DBO GPU tests, then the same with NCCL peer-to-peer off (traffic through the host).
  ( CUDA_VISIBLE_DEVICES=2,3 timeout 120 python -m pytest tests/worker/test_ubatching.py \
      tests/models/test_gpu_moe_models.py -k "dbo or traced or stream" -m gpu -q -p no:cacheprovider --tb=short \
      > /tmp/dbo_tests.txt 2>&1
    CUDA_VISIBLE_DEVICES=2,3 NCCL_P2P_DISABLE=1 timeout 205 python benchmarks/dbo_step.py --dp 2 --repeats 2 \
      --out "$out/dbo_step_dsv2lite_dp2_nop2p.json" > /tmp/dbo_b.txt 2>&1 ) &
  wait
  grep -E "^E |Error|passed|failed" /tmp/dbo_tests.txt | tail -12
  for f in /tmp/dbo_a.txt /tmp/dbo_b.txt /tmp/dbo_t.txt; do
    echo "== $f"; grep -E "ms/step|ERROR|Error|overlap" $f | tail -14
  done
  ;;
dbo4)
  # DP=4 x EP over NVLink (off / on / auto, prefill also at 8192 tokens per rank), then the
  # dense Llama-3-70B shape with TP=4: prefill off vs on.
  timeout 300 python benchmarks/dbo_step.py --dp 4 --prefill 8192 --interleave --out "$out/dbo_step_dsv2lite_dp4_nvlink.json" \
    2>&1 | grep -E "ms/step|ERROR|overlap"
  timeout 240 python benchmarks/dbo_step.py --shape llama3-70b --dp 1 --tp 4 --ep 0 --modes off,on --decode "" \
    --prefill 4096 --out "$out/dbo_step_llama3_70b_tp4.json" 2>&1 | grep -E "ms/step|ERROR"
  ;;
dboauto4)
  # DP=4 x EP, auto vs off/on with per-step decode timing: over NVLink, then with NCCL P2P off
  # (the decode rows of the P2P-off case were never measured); logs with auto's tables under $OUT.
  export BRAID_LOG_LEVEL=INFO
  for link in nvlink nop2p; do
    [ $link = nop2p ] && export NCCL_P2P_DISABLE=1
    timeout ${DBO_TIMEOUT:-280} python benchmarks/dbo_step.py --dp 4 --interleave \
      --out "$out/dbo_step_dsv2lite_dp4_auto_${link}.json" > "$out/dbo_dp4_${link}.log" 2>&1
    grep -E "ms/step|DBO auto policy|rror" "$out/dbo_dp4_${link}.log" | grep -v Warning | grep -v "worker-[123]" | tail -14
  done
  ;;
dbo256nop2p)
  # DP=4 x EP without P2P, decode 256 only, 10 interleaved repeats: the host-memory link slows down
  # in stretches of dozens of steps, which five repeats could not average out.
  export BRAID_LOG_LEVEL=INFO NCCL_P2P_DISABLE=1
  timeout ${DBO_TIMEOUT:-280} python benchmarks/dbo_step.py --dp 4 --interleave --decode 256 --repeats 10 \
    --out "$out/dbo_step_dsv2lite_dp4_auto_nop2p_d256.json" > "$out/dbo_dp4_nop2p_d256.log" 2>&1
  grep -E "ms/step|rror" "$out/dbo_dp4_nop2p_d256.log" | grep -v Warning | tail -8
  ;;
dbo70auto)
  # Dense Llama-3-70B shape, TP=4 prefill 4096: off / on / auto one after another (three 70B engines would
  # not fit side by side), over NVLink and with P2P off
  # (auto was never measured on the dense shape, where DBO pays without P2P: 0.79x).
  export BRAID_LOG_LEVEL=INFO
  for link in nvlink nop2p; do
    [ $link = nop2p ] && export NCCL_P2P_DISABLE=1
    timeout ${DBO_TIMEOUT:-280} python benchmarks/dbo_step.py --shape llama3-70b --dp 1 --tp 4 --ep 0 --modes off,on,auto \
      --decode "" --prefill 4096 --out "$out/dbo_step_llama3_70b_tp4_auto_${link}.json" > "$out/dbo_70b_${link}.log" 2>&1
    grep -E "ms/step|DBO auto policy|rror" "$out/dbo_70b_${link}.log" | grep -v Warning | grep -v "worker-[123]" | tail -6
  done
  ;;
dboauto)
  export BRAID_LOG_LEVEL=INFO  # workers log the auto policy's start-up table
  timeout 290 python benchmarks/dbo_step.py --dp 4 --interleave --out "$out/dbo_step_dsv2lite_dp4_auto_nvlink.json" \
    > "$out/dbo_dp4_nvlink.log" 2>&1
  CUDA_VISIBLE_DEVICES=0,1 timeout 270 python benchmarks/dbo_step.py --dp 2 --interleave \
    --out "$out/dbo_step_dsv2lite_dp2_auto_nvlink.json" > "$out/dbo_dp2_nvlink.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=2,3 NCCL_P2P_DISABLE=1 timeout 270 python benchmarks/dbo_step.py --dp 2 --interleave \
    --out "$out/dbo_step_dsv2lite_dp2_auto_nop2p.json" > "$out/dbo_dp2_nop2p.log" 2>&1 &
  wait
  for f in "$out"/dbo_dp*.log; do echo "== $f"; grep -E "ms/step|DBO auto policy|rror" "$f" | grep -v Warning | tail -20; done
  ;;
esac
