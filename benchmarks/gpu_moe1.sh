#!/usr/bin/env bash
# Issue 7 on one GPU, inside one 600 s device call: the MoE GPU tests, the fused-experts
# kernel against its floor, then W1-style throughput of both MoE shapes (CUDA graphs, and an
# eager traced run whose layer spans split the step into attention / experts).
# Usage: benchmarks/gpu_moe1.sh [NUM_PROMPTS]
source benchmarks/gpu_setup.sh
n=${1:-256}
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python -m pytest tests/models/test_gpu_moe_models.py tests/layers/moe "tests/layers/attention/test_triton_attention.py::test_gpu_wide_heads_fit" -m gpu -q \
  -p no:cacheprovider --tb=short 2>&1 | grep -E "^E |Error|passed|failed" | tail -8
timeout 120 python benchmarks/moe_kernel.py --out "$out/moe_kernel.json" 2>&1 | tail -13
for shape in deepseek-v2-lite qwen3-30b-a3b; do
  timeout 150 python benchmarks/w1_throughput.py --shape $shape --engines braid,braid-eager --num-prompts $n \
    --trace-dir /tmp/trace_$shape --out "$out/w1_${shape}_1gpu.json" 2>&1 | grep -E "floor|braid|rror" | grep -v Warning
  python benchmarks/span_split.py "$out/w1_${shape}_1gpu.json"
done
