"""Triton kernels: split-KV ("flash-decoding") attention for decode-only batches.

Torch reference: braid.layers.attention.torch_ref (TorchReferenceBackend / causal_attention).

A decode step has one query token per request, so the unified kernel launches only
num_reqs * num_kv_heads programs, each walking the whole context alone: with few
long sequences most SMs idle. Here each sequence's key range is cut into NUM_SPLITS
contiguous pieces, one program each (grid: requests x kv heads x splits). Every
piece leaves its unnormalised output, running max and sum in fp32 scratch, and a
second small kernel (grid: requests x query heads) merges them with the usual
log-sum-exp rescaling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid.layers.attention.triton_unified_attention import LOG2E, attend_kv_tiles, dot_precision, head_dim_pad
from braid.layers.triton_ops.pdl import pdl_enter, pdl_launch


@triton.jit(do_not_specialize=["stride_bt"])  # see triton_ops/__init__.py
def _split_kv_decode_kernel(
    acc_ptr,  # [num_reqs, Hq, NUM_SPLITS, HEAD_DIM_PAD] fp32
    max_ptr,  # [num_reqs, Hq, NUM_SPLITS] fp32
    sum_ptr,  # [num_reqs, Hq, NUM_SPLITS] fp32
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    num_heads,
    qk_scale,
    window,
    head_dim,
    block_size,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_enter(USE_PDL)
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) == q_start:  # request without a query this step
        return
    seq_len = tl.load(seq_lens_ptr + req)

    # Rows are the heads of this kv head's group (padded to BLOCK_M >= 16 for tl.dot).
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    head = kv_head * QUERIES_PER_KV + offs_m
    row_valid = offs_m < QUERIES_PER_KV
    q = tl.load(
        q_ptr + q_start.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_valid[:, None] & (offs_d < head_dim)[None, :],
        other=0.0,
    )
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)  # a decode is the last position

    # This split's share of the key tiles that the (windowed) query can see.
    if USE_WINDOW:
        first_tile = tl.maximum(seq_len - window, 0) // TILE_N
    else:
        first_tile = 0
    num_tiles = tl.cdiv(seq_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles - first_tile, NUM_SPLITS)
    tile_start = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # An empty split (short sequence) runs no tile and stores m = -inf, l = 0: weight 0 in the merge.
    acc, m_i, l_i = attend_kv_tiles(
        acc, m_i, l_i, q, q_pos, tile_start, tile_end, seq_len,
        key_cache_ptr, value_cache_ptr, block_table_ptr + req.to(tl.int64) * stride_bt,
        kv_head, head_dim, block_size, window, qk_scale,
        stride_cb, stride_cs, stride_ch, stride_cd,
        TILE_N, HEAD_DIM_PAD, USE_WINDOW, DOT_PRECISION,
    )  # fmt: skip

    part = (req.to(tl.int64) * num_heads + head) * NUM_SPLITS + split  # [BLOCK_M]
    tl.store(acc_ptr + part[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=row_valid[:, None])
    tl.store(max_ptr + part, m_i, mask=row_valid)
    tl.store(sum_ptr + part, l_i, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    query_start_loc_ptr,
    num_heads,
    head_dim,
    stride_ot,
    stride_oh,
    stride_od,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_enter(USE_PDL)
    req = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) == q_start:
        return

    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    part = (req.to(tl.int64) * num_heads + head) * NUM_SPLITS + offs_s
    m = tl.load(max_ptr + part)
    l = tl.load(sum_ptr + part)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM_PAD + offs_d[None, :])
    # Rescale every split to the global max; split 0 always holds keys, so m_max is finite.
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(
        out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < head_dim,
    )


def split_kv_decode_attention(
    out: torch.Tensor,  # [T, Hq, D]
    q: torch.Tensor,  # [T, Hq, D]; request r's one query token is q[query_start_loc[r]]
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    num_splits: int,
    scale: float,
    sliding_window: int | None = None,
    tile_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
) -> None:
    """Decode-only batches (every query_len <= 1): attention with the context split num_splits ways."""
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    _, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0:
        return
    queries_per_kv = num_heads // num_kv_heads
    d_pad = head_dim_pad(head_dim)
    acc = torch.empty(num_reqs, num_heads, num_splits, d_pad, dtype=torch.float32, device=q.device)
    row_max = torch.empty(num_reqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    _split_kv_decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        acc,
        row_max,
        row_sum,
        q,
        key_cache,
        value_cache,
        block_table,
        query_start_loc,
        seq_lens,
        num_heads,
        scale * LOG2E,
        sliding_window or 0,
        head_dim,
        block_size,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        block_table.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        key_cache.stride(3),
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_M=max(16, triton.next_power_of_2(queries_per_kv)),
        NUM_SPLITS=num_splits,
        TILE_N=tile_n,
        HEAD_DIM_PAD=d_pad,
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch(q, num_reqs),
    )
    _merge_splits_kernel[(num_reqs, num_heads)](
        out,
        acc,
        row_max,
        row_sum,
        query_start_loc,
        num_heads,
        head_dim,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        NUM_SPLITS=num_splits,
        HEAD_DIM_PAD=d_pad,
        **pdl_launch(q, num_reqs),
    )
