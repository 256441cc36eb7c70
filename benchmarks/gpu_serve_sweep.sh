#!/usr/bin/env bash
# braid serve under braid bench serve (Llama-3-8B shape), concurrency 1-256, with async scheduling:
# REPEATS sweeps, each its own server. Needs the server stack carried as wheels in .whl/.
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
repeats=${REPEATS:-2}
for r in $(seq 1 "$repeats"); do
  TAG="${TAG_PREFIX:-llama3_8b_async}_run$r" timeout 280 bash benchmarks/serve_sweep.sh llama3-8b "$out" \
    --max-num-seqs 256 --async-scheduling 2>&1 | grep -E "concurrency|Request throughput|Median TPOT|Failed|died|rror" | tail -24
done
