"""Decode-size GEMMs of the Llama-3-8B shape: cuBLAS vs braid's Triton skinny GEMM.

Each (matrix, M) is timed as a CUDA graph that runs the GEMM over enough
distinct weight copies to fill ~1 GiB, so weights come from HBM, not L2 (the
50 MB L2 holds a whole o_proj) and launch gaps are those of a graph replay, as
in a decode step. Reports ms per GEMM, the weight-read rate, and the floor
(weight bytes / measured copy bandwidth; FLOPs / measured matmul rate).

    python benchmarks/skinny_gemm.py --out result.json
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from braid.bench.floors import graph_median_ms, measure_copy_bandwidth, measure_matmul_rate, weight_copies
from braid.bench.run_info import run_info, write_result
from braid.layers.triton_ops.skinny_gemm import SkinnyConfig, skinny_gemm

LLAMA_MATRICES = {  # name: (in_features K, out_features N) for Llama-3-8B
    "qkv": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
    "lm_head": (4096, 128256),
}


def read_bandwidth(nbytes: int = 4 * 2**30) -> float:
    """Bytes/s of a read-mostly kernel (a sum): what a GEMV could reach at best."""
    t = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    ms = graph_median_ms(lambda: t.sum(dtype=torch.float32), 1)
    del t
    torch.cuda.empty_cache()
    return nbytes / (ms / 1e3)


def configs(m: int) -> list[SkinnyConfig]:
    if m <= 64:
        return [SkinnyConfig(block_n=bn, block_k=bk, split_k=sk, num_warps=4, num_stages=st)
                for bn, bk, sk, st in itertools.product((32, 64, 128), (128, 256), (1, 2, 4), (3, 5))]
    # Beyond 64 rows every row in one program (each weight tile read once), shorter K tiles for the
    # larger activation tile, more warps for the larger accumulator.
    block_m = min(256, 1 << (m - 1).bit_length())
    return [SkinnyConfig(block_n=bn, block_k=bk, split_k=sk, num_warps=w, num_stages=3, block_m=block_m)
            for bn, bk, sk, w in itertools.product((32, 64, 128), (64, 128), (1, 2, 4), (4, 8))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,16,32,64,128,256")
    p.add_argument("--triton-max-m", type=int, default=64, help="sweep the Triton kernel up to this many rows (<= 256)")
    p.add_argument("--matrices", default=",".join(LLAMA_MATRICES))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    bw, flops = measure_copy_bandwidth(), measure_matmul_rate()
    rbw = read_bandwidth()
    print(f"copy {bw / 1e12:.2f} TB/s  read {rbw / 1e12:.2f} TB/s  matmul {flops / 1e12:.0f} TFLOP/s")
    rows = []
    for name in a.matrices.split(","):
        k, n = LLAMA_MATRICES[name]
        nbytes = n * k * 2
        ws = weight_copies(n, k)
        copies = len(ws)
        for m in [int(v) for v in a.ms.split(",")]:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            floor = max(nbytes / bw, 2 * m * n * k / flops) * 1e3
            ref = F.linear(x, ws[0])
            cublas = graph_median_ms(lambda: [F.linear(x, w) for w in ws], copies)
            row = dict(matrix=name, m=m, k=k, n=n, floor_ms=floor, cublas_ms=cublas,
                       cublas_read_TBps=nbytes / cublas / 1e9)
            if m <= a.triton_max_m:
                tried = []
                for cfg in configs(m):
                    try:
                        err = (skinny_gemm(x, ws[0], None, cfg).float() - ref.float()).abs().max().item()
                        ms = graph_median_ms(lambda: [skinny_gemm(x, w, None, cfg) for w in ws], copies)
                    except Exception as e:  # shared memory overflow and the like: skip the config
                        tried.append(dict(config=cfg.__dict__, error=str(e)[:120]))
                        continue
                    tried.append(dict(config=cfg.__dict__, ms=ms, max_abs_err=err))
                ok = sorted((t for t in tried if "ms" in t), key=lambda t: t["ms"])
                row.update(triton_best=ok[0] if ok else None, triton_top=ok[:5],
                           triton_failed=sum("error" in t for t in tried))
                if ok:
                    row["triton_read_TBps"] = nbytes / ok[0]["ms"] / 1e9
            rows.append(row)
            best = row.get("triton_best")
            print(f"{name:>8} m={m:<4} floor {floor:.4f}  cublas {cublas:.4f} ({row['cublas_read_TBps']:.2f} TB/s)"
                  + (f"  triton {best['ms']:.4f} ({row['triton_read_TBps']:.2f} TB/s) {best['config']}"
                     f" err {best['max_abs_err']:.3g}" if best else ""), flush=True)
        del ws
        torch.cuda.empty_cache()
    write_result(a.out, dict(benchmark="skinny_gemm", **run_info(), copy_bandwidth_Bps=bw, read_bandwidth_Bps=rbw,
                             matmul_flops=flops, rows=rows))


if __name__ == "__main__":
    main()
