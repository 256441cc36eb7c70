"""Sorting a batch's (token, expert) pairs by expert, in blocks: the grouped GEMM
gives each block of BLOCK_M rows one expert, so every expert's list is padded to a
multiple of BLOCK_M with an out-of-range index (`num_pairs`, which the kernel masks)."""
from __future__ import annotations

import torch


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_pair_ids [P], block_expert [P // block_m]).

    A pair id p stands for token p // k, slot p % k. Padded entries hold T * k. Pairs
    whose expert is outside [0, num_experts) (another rank's expert) are dropped, and
    so are empty experts' blocks. Every shape is known on the host and no op reads a
    device value back (no bincount, no boolean indexing), so CUDA graphs can capture it."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    device = flat.device
    local = (flat >= 0) & (flat < num_experts)
    key = torch.where(local, flat, torch.full_like(flat, num_experts))  # foreign pairs sort last
    sorted_key, order = torch.sort(key, stable=True)
    # Where each expert's pairs begin in `order`, and how many it has (sorted keys: a search).
    src_starts = torch.searchsorted(sorted_key, torch.arange(num_experts + 1, device=device))
    counts = src_starts[1:] - src_starts[:-1]
    padded = (counts + block_m - 1) // block_m * block_m
    # Upper bound on the padded length, known on the host without a sync.
    capacity = (num_pairs + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded               # where each expert's padded run begins
    # Every sorted pair's destination; foreign pairs all go to one spare slot past the end.
    e = sorted_key.clamp(max=num_experts - 1)
    pos = starts[e] + (torch.arange(num_pairs, device=device) - src_starts[:-1][e])
    pos = torch.where(sorted_key < num_experts, pos, torch.full_like(pos, capacity))
    sorted_ids = torch.full((capacity + 1,), num_pairs, dtype=torch.int64, device=device)
    sorted_ids[pos] = order
    # Each block's expert; blocks past the last padded run get -1 (the kernel skips them).
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(starts + padded, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, torch.full_like(block_expert, -1))
    return sorted_ids[:capacity], block_expert
