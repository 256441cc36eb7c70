"""Process-group layout for tensor/pipeline/data/expert parallelism.

Only the single-device layout exists so far: every group has size 1 and rank 0.
Layers ask for their TP rank/size here so that sharding drops in later
without touching model code.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1


_layout = ParallelLayout()


def get_layout() -> ParallelLayout:
    return _layout


def get_tp_rank() -> int:
    return _layout.tp_rank


def get_tp_size() -> int:
    return _layout.tp_size


def get_pp_rank() -> int:
    return _layout.pp_rank


def get_pp_size() -> int:
    return _layout.pp_size
