"""The torch reference backend against naive dense causal attention without paging.

Also home of make_paged_batch, the random paged-batch builder the Triton tests share.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from braid.layers.attention.metadata import AttentionMetadata, build_attention_metadata
from braid.layers.attention.torch_ref import TorchReferenceBackend, gather_context


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D], T includes padded tail tokens
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor
    kv_cache: torch.Tensor  # context prefixes in place, every other slot random garbage
    metadata: AttentionMetadata
    dense_k: list[torch.Tensor]  # per request, all seq_len positions: [seq_len, Hkv, D]
    dense_v: list[torch.Tensor]
    query_lens: list[int]
    seq_lens: list[int]
    block_table: list[list[int]]


def make_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    pad_negative: int = 0,
    pad_short: int = 0,
    seed: int = 0,
    strided_qkv: bool = False,
) -> PagedBatch:
    """A random batch over a paged cache.

    Every request gets freshly shuffled, non-contiguous physical blocks (plus spare ones
    nobody owns); its first seq_len - query_len positions are already in the cache, the
    last query_len arrive as this step's k/v. Padding: pad_negative tail tokens with slot
    -1, then pad_short tail tokens that slot_mapping does not cover at all.
    strided_qkv: q/k/v are views into one packed [T, (Hq + 2 Hkv) * D] tensor, as after
    a fused qkv projection.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    needed = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(needed) + 5
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    block_table, i = [], 0
    for n in needed:
        block_table.append(ids[i : i + n])
        i += n
    md = build_attention_metadata(query_lens, seq_lens, block_table, block_size, device)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    cache = randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    dense_k = [randn(s, num_kv_heads, head_dim) for s in seq_lens]
    dense_v = [randn(s, num_kv_heads, head_dim) for s in seq_lens]
    for r, (q_len, s_len) in enumerate(zip(query_lens, seq_lens)):
        for pos in range(s_len - q_len):  # the cached prefix
            blk, off = block_table[r][pos // block_size], pos % block_size
            cache[0, blk, off] = dense_k[r][pos]
            cache[1, blk, off] = dense_v[r][pos]

    num_actual = sum(query_lens)
    num_tokens = num_actual + pad_negative + pad_short
    step_k = torch.cat([dense_k[r][s - ql :] for r, (ql, s) in enumerate(zip(query_lens, seq_lens))])
    step_v = torch.cat([dense_v[r][s - ql :] for r, (ql, s) in enumerate(zip(query_lens, seq_lens))])
    pad = num_tokens - num_actual
    step_k = torch.cat([step_k.reshape(num_actual, num_kv_heads, head_dim), randn(pad, num_kv_heads, head_dim)])
    step_v = torch.cat([step_v.reshape(num_actual, num_kv_heads, head_dim), randn(pad, num_kv_heads, head_dim)])
    q = randn(num_tokens, num_heads, head_dim)
    if strided_qkv:
        packed = torch.cat([q.flatten(1), step_k.flatten(1), step_v.flatten(1)], dim=1)
        a, b = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
        q = packed[:, :a].view(num_tokens, num_heads, head_dim)
        step_k = packed[:, a:b].view(num_tokens, num_kv_heads, head_dim)
        step_v = packed[:, b:].view(num_tokens, num_kv_heads, head_dim)
    if pad_negative:
        md.slot_mapping = torch.cat([md.slot_mapping, torch.full((pad_negative,), -1, dtype=torch.int64, device=device)])
    return PagedBatch(
        q=q.to(device),
        k=step_k.to(device),
        v=step_v.to(device),
        kv_cache=cache.to(device),
        metadata=md,
        dense_k=[t.to(device) for t in dense_k],
        dense_v=[t.to(device) for t in dense_v],
        query_lens=list(query_lens),
        seq_lens=list(seq_lens),
        block_table=block_table,
    )


def naive_attention(batch: PagedBatch, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Token by token, head by head, from the dense sequences: no paging, no batching tricks."""
    out = torch.zeros(batch.q.shape, dtype=torch.float64)
    group = batch.q.shape[1] // batch.dense_k[0].shape[1] if batch.dense_k else 1
    t = 0
    for r, (q_len, s_len) in enumerate(zip(batch.query_lens, batch.seq_lens)):
        keys, values = batch.dense_k[r].double().cpu(), batch.dense_v[r].double().cpu()
        for i in range(q_len):
            pos = s_len - q_len + i
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(batch.q.shape[1]):
                qv = batch.q[t, h].double().cpu()
                scores = keys[lo : pos + 1, h // group] @ qv * scale
                probs = torch.exp(scores - scores.max())
                probs = probs / probs.sum()
                out[t, h] = probs @ values[lo : pos + 1, h // group]
            t += 1
    return out


def assert_cache_holds_sequences(batch: PagedBatch, kv_cache: torch.Tensor) -> None:
    for r, s_len in enumerate(batch.seq_lens):
        table = torch.tensor(batch.block_table[r], dtype=torch.int32, device=kv_cache.device)
        keys, values = gather_context(kv_cache, table, s_len)
        torch.testing.assert_close(keys, batch.dense_k[r], rtol=0, atol=0)
        torch.testing.assert_close(values, batch.dense_v[r], rtol=0, atol=0)


# (query_lens, seq_lens): decodes, a fresh prefill, a chunked-prefill continuation over a
# cached prefix, and a request with nothing to compute this step.
MIXED = ([1, 7, 0, 5, 1, 9], [13, 7, 6, 21, 1, 40])


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2), (8, 2)])
@pytest.mark.parametrize("sliding_window", [None, 4])
@pytest.mark.parametrize("block_size", [8, 16])
def test_reference_matches_naive_dense(num_heads, num_kv_heads, sliding_window, block_size):
    query_lens, seq_lens = MIXED
    batch = make_paged_batch(query_lens, seq_lens, num_heads, num_kv_heads, 8, block_size, pad_negative=2, pad_short=1)
    before = batch.kv_cache.clone()
    scale = 0.3
    out = TorchReferenceBackend().forward(
        batch.q, batch.k, batch.v, batch.kv_cache, batch.metadata, scale, sliding_window
    )
    expected = naive_attention(batch, scale, sliding_window)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    # Every request's full sequence is now in its blocks; nothing else changed.
    assert_cache_holds_sequences(batch, batch.kv_cache)
    owned = torch.zeros(batch.kv_cache.shape[1], batch.kv_cache.shape[2], dtype=torch.bool)
    for r, s_len in enumerate(seq_lens):
        for pos in range(s_len):
            owned[batch.block_table[r][pos // block_size], pos % block_size] = True
    assert torch.equal(batch.kv_cache[:, ~owned], before[:, ~owned])
    # Padded tail tokens belong to no request.
    assert torch.all(out[sum(query_lens) :] == 0)


def test_reference_window_actually_masks():
    # Guard against a vacuous window test: the window must change the answer here.
    batch = make_paged_batch([3], [20], 2, 1, 8, 8)
    full = TorchReferenceBackend().forward(batch.q, batch.k, batch.v, batch.kv_cache.clone(), batch.metadata, 1.0)
    windowed = TorchReferenceBackend().forward(batch.q, batch.k, batch.v, batch.kv_cache.clone(), batch.metadata, 1.0, 4)
    assert not torch.allclose(full, windowed)
    torch.testing.assert_close(windowed.double(), naive_attention(batch, 1.0, 4), rtol=1e-5, atol=1e-6)
