"""Sorting a batch's (token, expert) pairs by expert, in blocks: the grouped GEMM
gives each block of BLOCK_M rows one expert, so every expert's list is padded to a
multiple of BLOCK_M with an out-of-range index (`num_pairs`, which the kernel masks)."""
from __future__ import annotations

import torch


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_pair_ids [P], block_expert [P // block_m]).

    A pair id p stands for token p // k, slot p % k. Padded entries hold T * k. Pairs
    whose expert is outside [0, num_experts) (another rank's expert) are dropped, and
    so are empty experts' blocks. Everything stays on the device (no host sync)."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    device = flat.device
    local = (flat >= 0) & (flat < num_experts)
    key = torch.where(local, flat, torch.full_like(flat, num_experts))  # foreign pairs sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    # Upper bound on the padded length, known on the host without a sync.
    capacity = (num_pairs + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded               # where each expert's padded run begins
    src_starts = torch.cumsum(counts, 0) - counts           # where it begins in `order`
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int64, device=device)
    rank_in_expert = torch.arange(num_pairs, device=device)
    expert_of_sorted = key[order]
    keep = expert_of_sorted < num_experts
    e = expert_of_sorted[keep]
    pos = starts[e] + (rank_in_expert[keep] - src_starts[e])
    sorted_ids[pos] = order[keep]
    # Each block's expert; blocks past the last padded run get -1 (the kernel skips them).
    block_starts = torch.arange(0, capacity, block_m, device=device)
    ends = starts + padded
    block_expert = torch.searchsorted(ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, torch.full_like(block_expert, -1))
    return sorted_ids, block_expert
