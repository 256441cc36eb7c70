"""Triton kernel: paged causal attention for a mixed batch of prefills and decodes, one launch.

Torch reference: braid.layers.attention.torch_ref (TorchReferenceBackend / causal_attention).

Grid: (query tiles, kv heads). A program takes BLOCK_Q query tokens of one request
and all QUERIES_PER_KV query heads that share one kv head (GQA), as the
BLOCK_M = BLOCK_Q * QUERIES_PER_KV rows of one matrix, so each key/value tile read
from the cache serves the whole head group. It walks the request's context in
TILE_N-key tiles through the block table (TILE_N is independent of the cache's
block_size, so block_size 8 still gives tl.dot shapes >= 16) with an fp32 online
softmax. The causal mask uses each query's absolute position
seq_len - query_len + i, so a cached prefix, a chunked-prefill continuation and a
decode are the same case.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid.layers.triton_ops.pdl import pdl_enter, pdl_launch

LOG2E = 1.4426950408889634


@triton.jit
def attend_kv_tiles(
    acc,  # [BLOCK_M, HEAD_DIM_PAD] fp32, unnormalised output
    m_i,  # [BLOCK_M] fp32 running max of the scores (log2 domain)
    l_i,  # [BLOCK_M] fp32 running sum of exp2(score - m_i)
    q,  # [BLOCK_M, HEAD_DIM_PAD]
    q_pos,  # [BLOCK_M] absolute position of each row's query token
    tile_start,
    tile_end,
    seq_len,
    key_cache_ptr,
    value_cache_ptr,
    block_table_row_ptr,  # this request's row of the block table
    kv_head,
    head_dim,
    block_size,
    window,
    qk_scale,  # softmax scale * log2(e): exp2 is cheaper than exp
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    TILE_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold key tiles [tile_start, tile_end) of one request into the online-softmax state."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < head_dim
    for j in range(tile_start, tile_end):
        pos = j * TILE_N + tl.arange(0, TILE_N)
        in_seq = pos < seq_len
        # Each key finds its physical block: keys of one tile may span several blocks.
        block = tl.load(block_table_row_ptr + pos // block_size, mask=in_seq, other=0).to(tl.int64)
        base = block * stride_cb + (pos % block_size) * stride_cs + kv_head * stride_ch
        k_t = tl.load(
            key_cache_ptr + base[None, :] + offs_d[:, None] * stride_cd,
            mask=in_seq[None, :] & d_mask[:, None],
            other=0.0,
        )
        v = tl.load(
            value_cache_ptr + base[:, None] + offs_d[None, :] * stride_cd,
            mask=in_seq[:, None] & d_mask[None, :],
            other=0.0,
        )
        s = tl.dot(q, k_t.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
        allowed = (pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        if USE_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no allowed key yet keeps m = -inf; subtracting 0
        # instead avoids (-inf) - (-inf) = NaN, and its p and alpha come out 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # p in the cache dtype: fp16/bf16 tensor cores; fp32 stays fp32 (ieee dot).
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _find_request(query_start_loc_ptr, tile_idx, num_reqs, BLOCK_Q: tl.constexpr):
    """The request that owns query tile tile_idx.

    Request r owns tile ids [qsl[r] // BLOCK_Q + r, qsl[r+1] // BLOCK_Q + r + 1): at least
    its cdiv(query_len, BLOCK_Q) tiles, found without a prefix sum over the batch. The
    first ids strictly increase with r (even for empty requests), so binary search works.
    """
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_reqs", "stride_bt"])  # see triton_ops/__init__.py
def _unified_attention_kernel(
    out_ptr,
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    num_reqs,
    qk_scale,
    window,
    head_dim,
    block_size,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_enter(USE_PDL)
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)

    req = _find_request(query_start_loc_ptr, tile_idx, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_tile = tile_idx - (q_start // BLOCK_Q + req)
    if q_tile * BLOCK_Q >= q_len:  # spare tile id (grid is an upper bound) or empty request
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len  # tokens already in the cache before this step's queries

    # Row m = (query token m // QUERIES_PER_KV, head m % QUERIES_PER_KV of this group).
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_local = q_tile * BLOCK_Q + offs_m // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    # BLOCK_M need not be a multiple of QUERIES_PER_KV (GQA 3): the leftover rows idle.
    row_valid = (offs_m < BLOCK_Q * QUERIES_PER_KV) & (q_local < q_len)
    q_pos = context_len + q_local
    token = (q_start + q_local).to(tl.int64)
    io_mask = row_valid[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=io_mask,
        other=0.0,
    )

    # Keys this tile can see: up to its last query's position (causal), and from its
    # first query's window start (sliding window); the mask handles the rest.
    last_q_pos = context_len + tl.minimum((q_tile + 1) * BLOCK_Q, q_len) - 1
    tile_end = tl.cdiv(last_q_pos + 1, TILE_N)
    if USE_WINDOW:
        first_key = tl.maximum(context_len + q_tile * BLOCK_Q - window + 1, 0)
        tile_start = first_key // TILE_N
    else:
        tile_start = 0

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend_kv_tiles(
        acc, m_i, l_i, q, q_pos, tile_start, tile_end, seq_len,
        key_cache_ptr, value_cache_ptr, block_table_ptr + req.to(tl.int64) * stride_bt,
        kv_head, head_dim, block_size, window, qk_scale,
        stride_cb, stride_cs, stride_ch, stride_cd,
        TILE_N, HEAD_DIM_PAD, USE_WINDOW, DOT_PRECISION,
    )  # fmt: skip
    # Every valid row sees at least its own key, so l_i > 0 there; idle rows divide by 1.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


def head_dim_pad(head_dim: int) -> int:
    # Power of two for tl.arange, at least 16 for tl.dot's minimum on GPUs.
    return max(16, triton.next_power_of_2(head_dim))


def wide_head_tiles(head_dim: int, dtype: torch.dtype) -> dict:
    """Heads padded to 512+ (MLA's 576-wide latent + rotary entries pad to 1024) need small
    key tiles, few pipeline stages and more warps to fit shared memory and registers."""
    if head_dim_pad(head_dim) >= 512:
        return dict(tile_n=16, num_warps=8, num_stages=2 if dtype.itemsize <= 2 else 1)
    return {}


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise run as TF32 (10-bit mantissa) on NVIDIA GPUs.
    return "ieee" if dtype == torch.float32 else "tf32"


def unified_attention(
    out: torch.Tensor,  # [T, Hq, D], written for the tokens of the requests
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    block_m: int | None = None,
    tile_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_reqs = seq_lens.shape[0]
    queries_per_kv = num_heads // num_kv_heads
    if block_m is None:
        # Decode-only batches fill a 16-row tile with one token's head group; prefills
        # get taller tiles so each key tile is reused by more queries.
        block_m = 16 if max_query_len * queries_per_kv <= 16 else 64
    block_m = max(block_m, triton.next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv
    # Upper bound on the tiles of all requests (see _find_request); independent of the
    # per-request lengths, so the grid only depends on the batch's shape.
    num_tiles = num_tokens // block_q + num_reqs
    if num_tiles == 0 or num_reqs == 0:
        return
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    _unified_attention_kernel[(num_tiles, num_kv_heads)](
        out,
        q,
        key_cache,
        value_cache,
        block_table,
        query_start_loc,
        seq_lens,
        num_reqs,
        scale * LOG2E,
        sliding_window or 0,
        head_dim,
        block_size,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        block_table.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        key_cache.stride(3),
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=tile_n,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch(q, num_tokens),
    )
