#!/usr/bin/env bash
# Issue 6 on 4 x H200: the NCCL equivalence tests, then W1 for one shape over TP=2, PP=2
# (micro-batches in flight, and one batch in flight), TP=4, PP=4 and TP=2 x PP=2, each run
# traced for per-rank GPU busy. Two 2-GPU runs share the host at a time (GPUs 0,1 and 2,3).
# Usage: benchmarks/gpu_parallel4.sh SHAPE PART...   SHAPE: llama3-8b | llama3-70b;
#        PART: tests | pairs (the 2-GPU runs) | four (the 4-GPU runs) | pp4ms (PP=4 async with and without
#        multi-step 8) | pp4layers (PP=4 async ms8: 4 vs 5 shares, even layers vs 9,8,8,7) | pp4partition
#        (PP=4 async, even layers vs PP4_LAYERS, e.g. 21_20_20_19 for the 70B shape) | pp4shares (PP=4
#        async, 4 vs 5 shares) | pp4chunks (PP=4 async, 8192- vs 2048-token batches). Each part fits a
#        10-minute call. TESTS_K: a pytest -k filter for the tests part; W1_REPEATS: W1 runs per engine.
source benchmarks/gpu_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
shape=$1
shift
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -4
w1() {  # w1 GPUS ENGINES TAG
  CUDA_VISIBLE_DEVICES=$1 timeout ${W1_TIMEOUT:-540} python benchmarks/w1_throughput.py --shape "$shape" \
    --engines "$2" --repeats ${W1_REPEATS:-1} --trace-dir "/tmp/trace-$shape-$3" --out "$out/w1_${shape}_$3.json" > "$out/w1_${shape}_$3.log" 2>&1
}
for part in "$@"; do
  case $part in
    tests) timeout -s INT 240 python -m pytest tests/distributed/test_gpu_parallel.py -m gpu -v -p no:cacheprovider \
             ${TESTS_K:+-k "$TESTS_K"} \
             --tb=short 2>&1 | grep -E "^E |Error|PASSED|FAILED|passed|failed|skipped|Interrupt" | tail -20 ;;
    pairs) w1 0,1 braid-tp2-async,braid-pp2-inflight1 pairs-a &
           w1 2,3 braid-pp2-async,braid-pp2 pairs-b &
           wait ;;
    four) w1 0,1,2,3 braid-tp4-async,braid-pp4-async,braid-tp2-pp2-async four ;;
    pp4ms) w1 0,1,2,3 braid-pp4-async,braid-pp4-async-ms8 pp4ms  # multi-step under PP: less host work per pass
           tar czf "$out/trace_${shape}_pp4ms.tgz" -C /tmp "trace-$shape-pp4ms" ;;
    # Shares: 4 (default) vs 5 (--max-concurrent-batches 5); then the last stage, which also runs the
    # LM head and sampling (~1.5 layers of time for the 8B shape), one layer lighter.
    pp4layers) w1 0,1,2,3 braid-pp4-async-ms8,braid-pp4-async-ms8-inflight5,braid-pp4-async-ms8-inflight5-layers9_8_8_7 \
                 pp4layers ;;
    # The last stage's LM head weighs ~1.2 layers of the 70B shape: one layer off it, one onto stage 0.
    pp4partition) w1 0,1,2,3 braid-pp4-async,braid-pp4-async-layers${PP4_LAYERS:-21_20_20_19} pp4partition
                  tar czf "$out/trace_${shape}_pp4partition.tgz" -C /tmp "trace-$shape-pp4partition" ;;
    # PP=4 async with one share per stage and with a fifth share (fills hand-over gaps), traced for
    # the decode steady state.
    # Smaller prefill chunks: with every stage as fast, a pipeline's fill and drain cost about
    # (stages - 1) x its largest chunk's time per stage (~0.41 s at 8192 tokens for the 70B shape).
    pp4chunks) w1 0,1,2,3 braid-pp4-async,braid-pp4-async-chunk2048 pp4chunks
               tar czf "$out/trace_${shape}_pp4chunks.tgz" -C /tmp "trace-$shape-pp4chunks" ;;
    pp4shares) w1 0,1,2,3 braid-pp4-async,braid-pp4-async-inflight5 pp4shares
               tar czf "$out/trace_${shape}_pp4shares.tgz" -C /tmp "trace-$shape-pp4shares" ;;
  esac
done
decode_busy() {  # per-stage busy in the decode steady state of every traced run of a part
  for d in /tmp/trace-$shape-$1/*/; do
    echo "$(basename $d): $(python benchmarks/pp_decode_busy.py $d 2>&1 | tail -1)"
  done | tee "$out/decode_busy_${shape}_$1.txt"
}
for part in "$@"; do
  case $part in pp4ms|pp4layers|pp4partition|pp4shares|pp4chunks) decode_busy $part ;; esac
done
for f in "$out"/w1_"$shape"_*.log; do grep -E "floor|braid|Error|error" "$f" | grep -v Warning | tail -6; done
