"""Compile the Triton kernel variants a run can meet before the first request.

Triton compiles a kernel the first time it meets a new set of constexprs (tile shapes
picked from the batch's shape) or argument specializations, and a compile mid-run stalls
the step for 0.2-0.8 s (under pipeline parallelism every stage waits). The start-up
profile run covers the widest prefill and CUDA-graph capture covers the decode batches;
the eager forwards here cover the rest: short prefills, whose tiles are picked by query
length (attention's 16-row tile for at most 16 query rows per KV head; the skinny GEMM's
16/32/64-row tiles), and, without CUDA graphs, decode batches of each size that changes a
kernel choice (split-KV count, GEMM tile, programmatic dependent launch on or off: a
separate compile of every kernel).
"""
from __future__ import annotations

from braid.layers.attention.triton_backend import choose_num_splits
from braid.layers.triton_ops.pdl import PDL_MAX_TOKENS
from braid.layers.triton_ops.skinny_gemm import block_m_for

# One request of each length: 2 picks the short-query attention tile and the 16-row GEMM
# tile, 32 and 64 the 32- and 64-row GEMM tiles (longer prefills go to cuBLAS).
PREFILL_LENGTHS = (2, 32, 64)


def decode_sizes(max_num_seqs: int, num_kv_heads: int) -> list[int]:
    """The smallest decode batch of each (split-KV count, GEMM row tile, PDL) choice."""
    firsts: dict[tuple[int, int, bool], int] = {}
    for rows in range(1, max_num_seqs + 1):
        firsts.setdefault((choose_num_splits(1, rows, num_kv_heads), block_m_for(rows), rows <= PDL_MAX_TOKENS), rows)
    return sorted(firsts.values())


def warm_up_batches(max_num_seqs: int, max_tokens: int, num_kv_heads: int, decode: bool) -> list[list[int]]:
    """Query lengths, request by request, of each warm-up batch (at most max_tokens tokens)."""
    batches = [[n] for n in PREFILL_LENGTHS if n <= max_tokens]
    if decode:
        batches += [[1] * rows for rows in decode_sizes(max_num_seqs, num_kv_heads) if rows <= max_tokens]
    return batches
