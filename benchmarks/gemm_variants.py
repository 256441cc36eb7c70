"""Decode GEMMs of 128/256 rows (Llama-3-8B matrices), cuBLAS in three guises against
Inductor's autotuned Triton templates (incl. Hopper's persistent TMA matmul): is there a
faster GEMM than `F.linear` for the batch-256 decode step, where cuBLAS runs at 1.3-1.5x
of max(weight bytes / copy rate, FLOPs / matmul rate)?

Timing as in skinny_gemm.py: a CUDA graph over ~1 GiB of distinct weight copies (HBM, not L2).

    python benchmarks/gemm_variants.py --out result.json
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from braid.bench.floors import graph_median_ms, measure_copy_bandwidth, measure_matmul_rate, weight_copies
from braid.bench.run_info import run_info, write_result

MATRICES = {"qkv": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="256,128")
    p.add_argument("--matrices", default=",".join(MATRICES))
    p.add_argument("--no-inductor", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
    try:
        inductor_config.triton.enable_persistent_tma_matmul = True
    except AttributeError:
        pass
    bw, flops = measure_copy_bandwidth(), measure_matmul_rate()
    print(f"copy {bw / 1e12:.2f} TB/s  matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for name in a.matrices.split(","):
        k, n = MATRICES[name]
        nbytes = n * k * 2
        ws = weight_copies(n, k)
        copies = len(ws)
        wts = [w.t().contiguous() for w in ws]  # K x N: cuBLAS's other operand layout
        for m in [int(v) for v in a.ms.split(",")]:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = F.linear(x, ws[0]).float()
            row = dict(matrix=name, m=m, k=k, n=n, floor_ms=max(nbytes / bw, 2 * m * n * k / flops) * 1e3)
            row["linear_ms"] = graph_median_ms(lambda: [F.linear(x, w) for w in ws], copies)
            row["matmul_kn_ms"] = graph_median_ms(lambda: [x @ w for w in wts], copies)
            row["matmul_kn_err"] = ((x @ wts[0]).float() - ref).abs().max().item()
            if not a.no_inductor:
                torch._dynamo.reset()
                t0 = time.perf_counter()
                fn = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
                try:
                    row["inductor_err"] = (fn(x, ws[0]).float() - ref).abs().max().item()
                    row["inductor_compile_s"] = time.perf_counter() - t0
                    row["inductor_ms"] = graph_median_ms(lambda: [fn(x, w) for w in ws], copies)
                except Exception as e:  # noqa: BLE001 - report and go on
                    row["inductor_error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(f"{name:>8} m={m:<4} floor {row['floor_ms'] * 1e3:7.1f} us  linear {row['linear_ms'] * 1e3:7.1f}"
                  f"  x@Wt {row['matmul_kn_ms'] * 1e3:7.1f}  inductor "
                  f"{row.get('inductor_ms', float('nan')) * 1e3:7.1f} {row.get('inductor_error', '')}", flush=True)
            write_result(a.out, dict(benchmark="gemm_variants", **run_info(), copy_bandwidth_Bps=bw,
                                     matmul_flops=flops, rows=rows))
        del ws, wts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
