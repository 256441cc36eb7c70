"""Process-group layout for tensor/pipeline parallelism.

Layers ask for their TP rank/size here at construction time, so a model built
after `init_model_parallel(tp_size)` holds only its rank's shards. Without any
call (or after `destroy_model_parallel()`) the layout is the single-device one:
every group has size 1 and rank 0, and torch.distributed need not be
initialised at all.

Rank layout (world = tp_size * pp_size ranks of the default process group):
tensor parallelism is the fastest-varying dimension,

    rank = pp_rank * tp_size + tp_rank

so the TP group of pipeline stage p is ranks [p*tp, (p+1)*tp) (on one host:
neighbouring GPUs, the fast links), and the PP group of TP rank t is
ranks {t, t + tp, t + 2*tp, ...}.

The process groups are per process (each rank is its own process), so keeping
them here is not forward-time global state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParallelLayout:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    # Layers per pipeline stage, first to last (None: an even split).
    pp_layer_partition: tuple[int, ...] | None = None


_layout = ParallelLayout()
_tp_group: Any = None  # torch.distributed ProcessGroup of this rank's TP group (None: single device)
_pp_group: Any = None
_tp_ranks: tuple[int, ...] = (0,)
_pp_ranks: tuple[int, ...] = (0,)


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


def get_tp_group():
    """This rank's TP process group; None for the single-device layout."""
    return _tp_group


def get_pp_group():
    """This rank's PP process group; None for the single-device layout."""
    return _pp_group


def pp_layer_range(num_layers: int, pp_rank: int | None = None, pp_size: int | None = None) -> tuple[int, int]:
    """Layers [start, end) of a pipeline stage: the layout's --pp-layer-partition when set,
    else an even split, the first stages taking one extra layer each when it does not
    divide (the last stage also runs the LM head)."""
    partition = _layout.pp_layer_partition if pp_rank is None and pp_size is None else None
    pp_rank = get_pp_rank() if pp_rank is None else pp_rank
    pp_size = get_pp_size() if pp_size is None else pp_size
    if partition is not None:
        if len(partition) != pp_size or sum(partition) != num_layers:
            raise ValueError(f"--pp-layer-partition {','.join(map(str, partition))} must give {pp_size} stages "
                             f"summing to the model's {num_layers} layers")
        start = sum(partition[:pp_rank])
        return start, start + partition[pp_rank]
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def is_first_pp_stage() -> bool:
    return _layout.pp_rank == 0


def is_last_pp_stage() -> bool:
    return _layout.pp_rank == _layout.pp_size - 1


def get_tp_ranks() -> tuple[int, ...]:
    """Global ranks of this rank's TP group, in TP-rank order."""
    return _tp_ranks


def get_pp_ranks() -> tuple[int, ...]:
    """Global ranks of this rank's PP group, in PP-rank order."""
    return _pp_ranks


def model_parallel_is_initialized() -> bool:
    return _tp_group is not None


def init_model_parallel(tp_size: int, pp_size: int = 1, backend: str | None = None,
                        pp_layer_partition: tuple[int, ...] | None = None) -> ParallelLayout:
    """Create the TP and PP groups over the initialised default process group
    and set this rank's layout. world_size must equal tp_size * pp_size; rank =
    pp_rank * tp_size + tp_rank. `backend` (e.g. "gloo", "nccl") is passed to
    dist.new_group; None uses the default group's backend.

    Every rank must call this (new_group is collective over the world), in the
    same order relative to other new_group calls. Build models after it."""
    global _layout, _tp_group, _pp_group, _tp_ranks, _pp_ranks
    import torch.distributed as dist

    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"tp_size and pp_size must be >= 1, got tp_size={tp_size}, pp_size={pp_size}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_model_parallel needs an initialised torch.distributed default process group")
    if _tp_group is not None:
        raise RuntimeError("model parallel groups are already initialised; call destroy_model_parallel() first")
    world_size = dist.get_world_size()
    if world_size != tp_size * pp_size:
        raise ValueError(
            f"world size {world_size} != tp_size {tp_size} * pp_size {pp_size}"
        )
    rank = dist.get_rank()
    pp_rank, tp_rank = divmod(rank, tp_size)

    # new_group is collective over all ranks: every rank creates every group, in the same order,
    # and keeps the ones it belongs to.
    tp_group = pp_group = None
    for p in range(pp_size):
        ranks = list(range(p * tp_size, (p + 1) * tp_size))
        group = dist.new_group(ranks, backend=backend)
        if p == pp_rank:
            tp_group, tp_ranks = group, tuple(ranks)
    for t in range(tp_size):
        ranks = list(range(t, world_size, tp_size))
        group = dist.new_group(ranks, backend=backend)
        if t == tp_rank:
            pp_group, pp_ranks = group, tuple(ranks)

    _tp_group, _pp_group = tp_group, pp_group
    _tp_ranks, _pp_ranks = tp_ranks, pp_ranks
    _layout = ParallelLayout(tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size,
                             pp_layer_partition=pp_layer_partition)
    return _layout


def destroy_model_parallel() -> None:
    """Drop the TP/PP groups and go back to the single-device layout. The
    default process group is left alone (the caller owns it)."""
    global _layout, _tp_group, _pp_group, _tp_ranks, _pp_ranks
    groups = [g for g in (_tp_group, _pp_group) if g is not None]
    _layout = ParallelLayout()
    _tp_group = _pp_group = None
    _tp_ranks = _pp_ranks = (0,)
    if groups:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for g in groups:
                try:
                    dist.destroy_process_group(g)
                except Exception:  # noqa: BLE001 - best effort; some backends refuse per-group teardown
                    pass
