"""The fused-experts Triton kernel (gate/up GEMM, SiLU-and-mul, down GEMM, weighted sum)
on real MoE layer shapes, against its floor: max(bytes of the experts it must read +
activations / copy bandwidth, FLOPs / matmul rate). Medians of CUDA-event timings.

    python benchmarks/moe_kernel.py --out $OUT/moe_kernel.json
"""
from __future__ import annotations

import argparse
import json

import torch

from braid.bench.floors import _median_ms, measure_copy_bandwidth, measure_matmul_rate
from braid.bench.run_info import run_info
from braid.layers.moe.fused_moe_kernel import fused_experts_triton
from braid.layers.moe.routing import softmax_topk

# (name, experts, top_k, hidden, moe intermediate) of one MoE layer.
LAYERS = [("qwen3-30b-a3b", 128, 8, 2048, 768), ("deepseek-v2-lite", 64, 6, 2048, 1408)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16,64,256,1024,4096")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    bw, flops = measure_copy_bandwidth(), measure_matmul_rate()
    rows = []
    for name, experts, top_k, hidden, inter in LAYERS:
        g = torch.Generator(device="cuda").manual_seed(0)
        w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
            weights, ids = softmax_topk(torch.randn(tokens, experts, device="cuda", generator=g), top_k, True)
            ms = _median_ms(lambda: fused_experts_triton(x, w13, w2, weights, ids), iters=30, warmup=5)
            touched = int(ids.unique().numel())
            weight_bytes = touched * 3 * inter * hidden * 2
            act_bytes = tokens * hidden * 2 * 2 + tokens * top_k * (2 * inter + inter + hidden) * 2 * 2
            flop = tokens * top_k * 2 * 3 * inter * hidden
            floor_ms = max((weight_bytes + act_bytes) / bw, flop / flops) * 1e3
            rows.append(dict(layer=name, tokens=tokens, experts_touched=touched, ms=ms, floor_ms=floor_ms,
                             x_floor=ms / floor_ms, weight_bytes=weight_bytes, flops=flop))
            print(f"{name:>18} T={tokens:>5} experts {touched:>3}: {ms:8.3f} ms, floor {floor_ms:7.3f} ms, "
                  f"x{ms / floor_ms:5.2f}")
    with open(args.out, "w") as f:
        json.dump(dict(benchmark="moe_kernel", **run_info(), copy_bandwidth_Bps=bw, matmul_flops=flops, rows=rows),
                  f, indent=2)


if __name__ == "__main__":
    main()
