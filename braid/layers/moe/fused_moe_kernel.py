"""Triton grouped GEMM for the fused experts: one program computes a BLOCK_M x BLOCK_N
tile of one expert's output for BLOCK_M (token, expert) pairs sorted by expert
(align.py). Two calls make the experts: x @ w13[e]^T for every pair (rows gathered
from x), SiLU-and-mul, then h @ w2[e]^T scaled by the router weight; a final sum over
each token's k pairs. Torch reference: fused_moe_ref.fused_experts_ref."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid.layers.activation import SiluAndMul
from braid.layers.moe.align import align_by_expert


@triton.jit(do_not_specialize=["num_pairs"])  # see layers/triton_ops/__init__.py
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, w_ptr, sorted_ids_ptr, block_expert_ptr,
    N, K, num_pairs, a_row_div,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    MUL_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # past the last expert's padded run
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs  # padding entries hold num_pairs
    a_row = (pair // a_row_div).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_base = b_ptr + expert * stride_be
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptr + a_row[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + offs_n[None, :] * stride_bn + (k0 + offs_k)[:, None] * stride_bk,
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    if MUL_WEIGHT:
        w = tl.load(w_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def default_config(num_pairs: int, num_experts: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile shape for one fused-experts call (benchmarks/moe_kernel.py sweeps the others)."""
    stages = 4 if dtype.itemsize <= 2 else 2  # fp32 tiles take twice the shared memory
    if num_pairs <= 2 * num_experts * 16:  # few pairs per expert (decode): small tiles pad less
        return dict(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=stages)
    return dict(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=stages)


def _gemm(a, b, c, sorted_ids, block_expert, a_row_div, weights, config):
    num_pairs = c.shape[0]
    n, k = b.shape[1], b.shape[2]
    grid = (block_expert.numel(), triton.cdiv(n, config["block_n"]))
    _moe_gemm_kernel[grid](
        a, b, c, weights if weights is not None else c, sorted_ids, block_expert,
        n, k, num_pairs, a_row_div,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        MUL_WEIGHT=weights is not None, PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], BLOCK_K=config["block_k"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """Same contract as fused_experts_ref; `config` overrides the tile shape (default_config)."""
    num_tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    num_pairs = num_tokens * top_k
    config = config or default_config(num_pairs, num_experts, x.dtype)
    sorted_ids, block_expert = align_by_expert(topk_ids, num_experts, config["block_m"])
    gate_up = torch.empty((num_pairs, 2 * inter), dtype=x.dtype, device=x.device)
    _gemm(x, w13, gate_up, sorted_ids, block_expert, top_k, None, config)
    h = SiluAndMul()(gate_up)
    # Pairs of other ranks' experts are never written: they must add nothing.
    out = torch.zeros((num_pairs, w2.shape[1]), dtype=torch.float32, device=x.device)
    _gemm(h, w2, out, sorted_ids, block_expert, 1, topk_weights.reshape(-1).float().contiguous(), config)
    return out.view(num_tokens, top_k, w2.shape[1]).sum(dim=1).to(x.dtype)
