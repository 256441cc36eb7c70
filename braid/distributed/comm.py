"""Collectives used by model layers, in one place.

Tensor-parallel layers call these and nothing else; with one TP rank they are
identities. When TP lands, these functions go through the TP process group
(and DBO's yield/switch hooks wrap them), with no change in the layers.
"""
from __future__ import annotations

import torch

from braid.distributed.parallel_state import get_tp_size


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the TP group (RowParallelLinear outputs, vocab-parallel embedding)."""
    if get_tp_size() == 1:
        return x
    raise NotImplementedError("tensor-parallel all-reduce is not wired yet (tp_size > 1)")


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each TP rank's x along dim (vocab-parallel logits)."""
    if get_tp_size() == 1:
        return x
    raise NotImplementedError("tensor-parallel all-gather is not wired yet (tp_size > 1)")
