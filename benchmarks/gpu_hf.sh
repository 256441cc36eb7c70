#!/usr/bin/env bash
# HF transformers generate_batch on the full W1 workload (long: run alone).
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout 570 python benchmarks/w1_throughput.py --engines hf --out "$out/w1_hf.json" 2>&1 | tr '\r' '\n' | grep -v Warn | tail -4
