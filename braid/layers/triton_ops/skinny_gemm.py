"""Triton GEMM for few rows: y = x @ w.T (+ bias) with x [M, K], M small (decode).

A decode step's linears are weight-bandwidth bound: every weight byte is read
once for a handful of rows. The kernel gives each program BLOCK_N output
features and streams their weight rows over K (optionally a 1/SPLIT_K share of
K), computing acc[BLOCK_N, BLOCK_M] = w_tile @ x_tile.T so the weight tile is
the MMA's large side and the few token rows its narrow side. With SPLIT_K > 1
the partial sums go to an fp32 scratch [SPLIT_K, M, N] and a second kernel adds
them in a fixed order (deterministic, unlike atomics), adds the bias and casts.

Torch reference: torch.nn.functional.linear.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from braid.layers.triton_ops.pdl import pdl_enabled, pdl_enter, pdl_launch, prefetch_l2


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = 0  # token rows per program; 0: by row count (block_m_for), at most 64


@triton.jit(do_not_specialize=["M", "stride_os"])  # see triton_ops/__init__.py
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_os,
                        K_PER_SPLIT, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                        USE_PDL: tl.constexpr = False, PREFETCH_K: tl.constexpr = 0, PER_LINE: tl.constexpr = 64):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = split * K_PER_SPLIT
    k_len = tl.minimum(K - k_start, K_PER_SPLIT)
    if PREFETCH_K > 0:  # weights are never written by a step: fetch the first ones before waiting
        offs_line = tl.arange(0, PREFETCH_K // PER_LINE) * PER_LINE  # one pointer per 128-byte line
        keep = (offs_n[:, None] < N) & (offs_line[None, :] < k_len)
        prefetch_l2(tl.where(keep, w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_line)[None, :],
                             w_ptr))
    pdl_enter(USE_PDL)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (k_start + offs_k)[:, None]
    m_mask = offs_m[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        if EVEN_K:
            if EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=offs_n[:, None] < N, other=0.0)
            x_mask = m_mask
        else:
            k_mask = offs_k < k_len - k * BLOCK_K
            w = tl.load(w_ptrs, mask=(offs_n[:, None] < N) & k_mask[None, :], other=0.0)
            x_mask = m_mask & k_mask[:, None]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out_ptrs = out_ptr + split * stride_os + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    mask = m_mask & (offs_n[:, None] < N)
    if HAS_BIAS:  # only when not split: the reduce kernel adds it otherwise
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["MN"])
def _split_k_reduce_kernel(part_ptr, b_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def config_for_rows(m: int, shared_memory: int | None = None) -> SkinnyConfig:
    """Tile shape by row count, from the Llama-3-8B sweep on H100 (benchmarks/skinny_gemm.py):
    long K tiles with deep pipelining read fastest for up to 16 rows; beyond, shorter K tiles
    keep the activation tile's share of shared memory in check. The pipeline is as deep as
    the device's shared memory allows."""
    block_n, block_k = 64, (256 if m <= 16 else 128)
    per_stage = (block_n + block_m_for(m)) * block_k * 2
    budget = (shared_memory if shared_memory is not None else _shared_memory_per_block()) - 16 * 1024
    stages = max(2, min(5, budget // per_stage))
    return SkinnyConfig(block_n=block_n, block_k=block_k, split_k=1, num_warps=4, num_stages=stages)


@functools.cache
def _shared_memory_per_block() -> int:
    if not torch.cuda.is_available():
        return 232448  # H100's opt-in limit; only the interpreter gets here
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


def prefetch_width(k_per_split: int, config: SkinnyConfig) -> int:
    """Weight columns per row to pull into L2 before the PDL wait (BRAID_PDL=2): as many as the
    pipeline's first loads read, a power of two."""
    first_loads = min(k_per_split, config.block_k * config.num_stages, 1024)
    return 1 << (first_loads.bit_length() - 1)


def block_m_for(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: SkinnyConfig = SkinnyConfig()) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias [N]) -> [M, N] in x's dtype; weight row-major."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"skinny_gemm: weight {tuple(weight.shape)} must be a row-major [N, {k}] matrix")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = config.block_m or block_m_for(m)
    split = max(1, config.split_k)
    k_per_split = triton.cdiv(triton.cdiv(k, split), config.block_k) * config.block_k
    split = triton.cdiv(k, k_per_split)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m), split)
    launch = pdl_launch(x, m)
    prefetch_k = prefetch_width(k_per_split, config) if launch["USE_PDL"] and pdl_enabled(x) == 2 else 0
    _skinny_gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, part, m, n, k, x.stride(0), weight.stride(0),
        n, m * n, k_per_split,
        HAS_BIAS=bias is not None and split == 1, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        EVEN_N=n % config.block_n == 0, EVEN_K=k % k_per_split == 0 and k_per_split % config.block_k == 0,
        PREFETCH_K=prefetch_k, PER_LINE=128 // weight.element_size(), num_warps=config.num_warps,
        num_stages=config.num_stages, **launch)
    if split > 1:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            part, bias if bias is not None else part, out, m * n, n, SPLIT_K=split, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=4, **launch)
    return out
