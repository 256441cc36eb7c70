"""Attention backend on Triton kernels over the paged KV cache.

Per forward: one kernel writes this step's k/v into the cache, then either the
unified kernel (any mix of prefills, chunked-prefill continuations and decodes,
one launch) or, for decode-only batches with long contexts, the split-KV decode
kernels. Same contract as torch_ref.TorchReferenceBackend, which is the spec.
"""
from __future__ import annotations

import torch

from braid.layers.attention.metadata import AttentionMetadata
from braid.layers.attention.triton_cache_write import write_kv_cache_triton
from braid.layers.attention.triton_decode_attention import split_kv_decode_attention
from braid.layers.attention.triton_unified_attention import unified_attention, wide_head_tiles

# Split-KV decode pays a second launch and fp32 scratch traffic; it wins when one
# program per (request, kv head) leaves most SMs idle. H100 profile (Llama-3-8B shape,
# context 512): batch 1 spent ~30 us per layer in 8 serial programs unsplit; batch 64
# (512 programs) gains nothing from splitting, batch 16 (128 programs) runs 20% faster split
# 4 ways than 2 (graph-timed, benchmarks/profile_decode.py). The choice depends on the batch's shape
# only, never on its lengths: a CUDA graph (captured for any length) and an eager run
# of the same batch must reduce in the same order to give the same tokens.
TARGET_PROGRAMS = 512  # about four programs per SM on an H100 (132 SMs)
MAX_SPLITS = 16


def choose_num_splits(max_query_len: int, num_reqs: int, num_kv_heads: int) -> int:
    """1 = unified kernel; >1 = split-KV decode with that many (power-of-two) splits."""
    programs = num_reqs * num_kv_heads
    if max_query_len != 1 or programs >= TARGET_PROGRAMS:
        return 1
    splits = min(TARGET_PROGRAMS // programs, MAX_SPLITS)
    power = 1
    while power * 2 <= splits:
        power *= 2
    return power


class TritonBackend:
    name = "triton"
    # Attention layers may rotate q/k and write the cache in one kernel, then pass
    # kv_cache_written=True (braid.layers.triton_ops.rotary).
    fuses_rope_and_cache_write = True

    def __init__(self, num_kv_splits: int | None = None) -> None:
        # num_kv_splits forces the decode path choice (tests, benchmarks): 1 = never
        # split, N > 1 = split N ways whenever the batch is decode-only.
        self.num_kv_splits = num_kv_splits

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        kv_cache_written: bool = False,
    ) -> torch.Tensor:
        if not kv_cache_written:
            write_kv_cache_triton(k, v, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(q)
        # Padded tail tokens belong to no request: zeros, as in the reference.
        out[metadata.num_actual_tokens :].zero_()
        if metadata.num_reqs == 0 or metadata.num_actual_tokens == 0:
            return out

        num_kv_heads = kv_cache.shape[3]
        if metadata.max_query_len == 1:
            if self.num_kv_splits is not None:
                splits = self.num_kv_splits
            else:
                splits = choose_num_splits(1, metadata.num_reqs, num_kv_heads)
        else:
            splits = 1
        tiles = wide_head_tiles(q.shape[-1], q.dtype)
        if splits > 1:
            split_kv_decode_attention(
                out, q, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table,
                splits, scale, sliding_window, **tiles,
            )  # fmt: skip
        else:
            if tiles:  # one query row tile: a wide [BLOCK_M, HEAD_DIM] block must stay small
                tiles["block_m"] = 16
            unified_attention(
                out, q, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table,
                metadata.max_query_len, scale, sliding_window, **tiles,
            )  # fmt: skip
        return out
