#!/usr/bin/env bash
# HF transformers generate_batch on W1 (long: run alone), after the GPU tests.
source benchmarks/gpu_setup.sh
out=${1:-$OUT}
timeout 120 python -m pytest tests/engine/test_gpu_cuda_graphs.py tests/layers/attention -m gpu -q -p no:cacheprovider \
  --tb=line 2>&1 | tail -4
python -c "import transformers; print('transformers', transformers.__version__)"
timeout 100 python benchmarks/w1_throughput.py --engines hf --num-prompts 64 --out "$out/w1_hf_64.json" 2>&1 | grep -v Warn | tail -2
timeout 330 python benchmarks/w1_throughput.py --engines hf --out "$out/w1_hf.json" 2>&1 | grep -v Warn | tail -2
