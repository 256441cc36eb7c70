"""The fused-experts Triton kernel (gate/up GEMM, SiLU-and-mul, down GEMM, weighted sum)
on real MoE layer shapes, against its floor: max(bytes of the experts it must read +
activations / copy bandwidth, FLOPs / matmul rate). Medians of CUDA-event timings of a
CUDA graph of one call (the GPU time, as in the engine's graphs), beside the eager call
(which adds the host's launch cost), and a small sweep of tile shapes.

    python benchmarks/moe_kernel.py --out $OUT/moe_kernel.json
"""
from __future__ import annotations

import argparse
import json

import torch

from braid.bench.floors import _median_ms, measure_copy_bandwidth, measure_matmul_rate
from braid.bench.run_info import run_info
from braid.layers.moe.fused_moe_kernel import default_config, fused_experts_triton
from braid.layers.moe.routing import softmax_topk

# (name, experts, top_k, hidden, moe intermediate) of one MoE layer.
LAYERS = [("qwen3-30b-a3b", 128, 8, 2048, 768), ("deepseek-v2-lite", 64, 6, 2048, 1408)]
SWEEP = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in [(16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 3), (32, 64, 64, 4, 4),
                                  (64, 64, 64, 4, 4), (64, 128, 64, 8, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
                                  (128, 64, 64, 4, 4)]]


def graph_ms(fn) -> float:
    fn()  # compile outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = _median_ms(graph.replay, iters=30, warmup=5)
    del graph
    return ms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16,64,256,1024,4096")
    p.add_argument("--no-sweep", action="store_true")
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
            eager_ms = _median_ms(lambda: fused_experts_triton(x, w13, w2, weights, ids), iters=30, warmup=5)
            default = default_config(tokens * top_k, experts)
            ms = graph_ms(lambda: fused_experts_triton(x, w13, w2, weights, ids))
            sweep = []
            for cfg in ([] if args.no_sweep else SWEEP):
                try:
                    sweep.append(dict(config=cfg, ms=graph_ms(lambda: fused_experts_triton(x, w13, w2, weights, ids,
                                                                                         config=cfg))))
                except Exception as e:  # noqa: BLE001 - a tile shape the GPU cannot hold
                    sweep.append(dict(config=cfg, error=f"{type(e).__name__}: {str(e)[:120]}"))
            best = min((r for r in sweep if "ms" in r), key=lambda r: r["ms"], default=dict(config=default, ms=ms))
            touched = int(ids.unique().numel())
            weight_bytes = touched * 3 * inter * hidden * 2
            act_bytes = tokens * hidden * 2 * 2 + tokens * top_k * (2 * inter + inter + hidden) * 2 * 2
            flop = tokens * top_k * 2 * 3 * inter * hidden
            floor_ms = max((weight_bytes + act_bytes) / bw, flop / flops) * 1e3
            rows.append(dict(layer=name, tokens=tokens, experts_touched=touched, ms=ms, eager_ms=eager_ms,
                             floor_ms=floor_ms, x_floor=ms / floor_ms, default_config=default,
                             best_ms=best["ms"], best_config=best["config"], sweep=sweep,
                             weight_bytes=weight_bytes, flops=flop))
            print(f"{name:>16} T={tokens:>5} experts {touched:>3}: graph {ms:7.3f} ms (eager {eager_ms:6.3f}), "
                  f"floor {floor_ms:6.3f} ms, x{ms / floor_ms:5.2f}; best {best['ms']:7.3f} "
                  + ",".join(str(v) for v in best["config"].values()))
    with open(args.out, "w") as f:
        json.dump(dict(benchmark="moe_kernel", **run_info(), copy_bandwidth_Bps=bw, matmul_flops=flops, rows=rows),
                  f, indent=2)


if __name__ == "__main__":
    main()
