"""Reference attention over the paged KV cache in plain torch.

Slow (a Python loop over requests) but obviously right; it defines what the
Triton kernels must compute, and runs on any device.
"""
from __future__ import annotations

import torch

from braid.layers.attention.metadata import AttentionMetadata


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys/values into their cache slots; negative slots are padding."""
    num_tokens = slot_mapping.shape[0]
    k, v = k[:num_tokens], v[:num_tokens]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_context(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one request's first seq_len positions: [seq_len, num_kv_heads, head_dim] each."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_ids[:num_blocks].long()
    keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    values = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return keys, values


def causal_attention(
    q: torch.Tensor,  # [query_len, num_heads, head_dim]
    keys: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    values: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of the last query_len positions of a sequence over all its seq_len positions.

    Query head h reads kv head h // group. The group's heads are stacked as rows of one
    matrix per kv head, so every product is one batched matmul over the kv heads (no
    copy of the keys per query head): this runs once per request and layer on CPU.
    """
    query_len, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    # Rows of kv head j: (its query head g, query position i) at row g * query_len + i.
    rows = q.float().view(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    rows = rows.reshape(num_kv_heads, group * query_len, head_dim)
    scores = torch.matmul(rows, keys.float().permute(1, 2, 0)) * scale  # [kv heads, rows, seq_len]
    if query_len > 1 or sliding_window is not None:  # a lone last query sees every key
        q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device).repeat(group)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.float().permute(1, 0, 2))  # [kv heads, rows, head_dim]
    out = out.view(num_kv_heads, group, query_len, head_dim).permute(2, 0, 1, 3)
    return out.reshape(query_len, num_heads, head_dim).to(q.dtype)


class TorchReferenceBackend:
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, metadata.slot_mapping)
        out = torch.zeros_like(q)
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        for r, seq_len in enumerate(seq_lens):
            start, end = starts[r], starts[r + 1]
            if end == start:
                continue
            keys, values = gather_context(kv_cache, metadata.block_table[r], seq_len)
            out[start:end] = causal_attention(q[start:end], keys, values, scale, sliding_window)
        return out
