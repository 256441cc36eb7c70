"""Process-group layout for tensor/pipeline parallelism.

Layers ask for their TP rank/size here at construction time, so a model built
after `init_model_parallel(tp_size)` holds only its rank's shards. Without any
call (or after `destroy_model_parallel()`) the layout is the single-device one:
every group has size 1 and rank 0, and torch.distributed need not be
initialised at all.

Rank layout (world = dp_size * pp_size * tp_size ranks of the default process
group): tensor parallelism is the fastest-varying dimension, data parallelism
the slowest,

    rank = (dp_rank * pp_size + pp_rank) * tp_size + tp_rank

so a TP group is tp neighbouring ranks (on one host: neighbouring GPUs, the fast
links); the PP group of a rank holds the same (dp, tp) position at every stage;
the DP group the same (pp, tp) position in every replica; and the EP group (the
ranks that share one stage's experts) is every DP x TP rank of that stage.

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
    dp_rank: int = 0
    dp_size: int = 1
    # --enable-expert-parallel: MoE layers shard whole experts over the EP group.
    expert_parallel: bool = False
    # --all2all-backend: how MoE layers move tokens over the EP group.
    all2all_backend: str = "allgather_reducescatter"

    @property
    def ep_size(self) -> int:
        return self.dp_size * self.tp_size

    @property
    def ep_rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank


_layout = ParallelLayout()
_tp_group: Any = None  # torch.distributed ProcessGroup of this rank's TP group (None: single device)
_pp_group: Any = None
_dp_group: Any = None
_ep_group: Any = None
_tp_ranks: tuple[int, ...] = (0,)
_pp_ranks: tuple[int, ...] = (0,)
_dp_ranks: tuple[int, ...] = (0,)
_ep_ranks: tuple[int, ...] = (0,)


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


def get_dp_group():
    """This rank's DP process group (same stage and TP rank in every replica); None when dp_size is 1."""
    return _dp_group


def get_ep_group():
    """This rank's expert-parallel group (every DP x TP rank of its stage); None for one device."""
    return _ep_group


def get_dp_ranks() -> tuple[int, ...]:
    return _dp_ranks


def get_ep_ranks() -> tuple[int, ...]:
    return _ep_ranks


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
                        pp_layer_partition: tuple[int, ...] | None = None, dp_size: int = 1,
                        expert_parallel: bool = False,
                        all2all_backend: str = "allgather_reducescatter") -> ParallelLayout:
    """Create the TP, PP, DP and EP groups over the initialised default process group
    and set this rank's layout. world_size must equal dp_size * pp_size * tp_size (see the
    module doc for the rank layout). `backend` (e.g. "gloo", "nccl") is passed to
    dist.new_group; None uses the default group's backend.

    Every rank must call this (new_group is collective over the world), in the
    same order relative to other new_group calls. Build models after it."""
    global _layout, _tp_group, _pp_group, _dp_group, _ep_group, _tp_ranks, _pp_ranks, _dp_ranks, _ep_ranks
    import torch.distributed as dist

    if tp_size < 1 or pp_size < 1 or dp_size < 1:
        raise ValueError(f"tp_size, pp_size and dp_size must be >= 1, got tp_size={tp_size}, pp_size={pp_size}, "
                         f"dp_size={dp_size}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_model_parallel needs an initialised torch.distributed default process group")
    if _tp_group is not None:
        raise RuntimeError("model parallel groups are already initialised; call destroy_model_parallel() first")
    world_size = dist.get_world_size()
    if world_size != dp_size * pp_size * tp_size:
        raise ValueError(f"world size {world_size} != dp_size {dp_size} * pp_size {pp_size} * tp_size {tp_size}")
    rank = dist.get_rank()
    dp_rank, rest = divmod(rank, pp_size * tp_size)
    pp_rank, tp_rank = divmod(rest, tp_size)

    def rank_of(d: int, p: int, t: int) -> int:
        return (d * pp_size + p) * tp_size + t

    # new_group is collective over all ranks: every rank creates every group, in the same
    # order, and keeps the ones it belongs to.
    def make_groups(all_ranks: list[list[int]]):
        mine = None
        for ranks in all_ranks:
            group = dist.new_group(ranks, backend=backend)
            if rank in ranks:
                mine = (group, tuple(ranks))
        return mine

    dps, pps, tps = range(dp_size), range(pp_size), range(tp_size)
    _tp_group, _tp_ranks = make_groups([[rank_of(d, p, t) for t in tps] for d in dps for p in pps])
    _pp_group, _pp_ranks = make_groups([[rank_of(d, p, t) for p in pps] for d in dps for t in tps])
    _dp_group, _dp_ranks = make_groups([[rank_of(d, p, t) for d in dps] for p in pps for t in tps])
    _ep_group, _ep_ranks = make_groups([[rank_of(d, p, t) for d in dps for t in tps] for p in pps])
    _layout = ParallelLayout(tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size,
                             pp_layer_partition=pp_layer_partition, dp_rank=dp_rank, dp_size=dp_size,
                             expert_parallel=expert_parallel, all2all_backend=all2all_backend)
    return _layout


def destroy_model_parallel() -> None:
    """Drop the groups and go back to the single-device layout. The default
    process group is left alone (the caller owns it)."""
    global _layout, _tp_group, _pp_group, _dp_group, _ep_group, _tp_ranks, _pp_ranks, _dp_ranks, _ep_ranks
    groups = [g for g in (_tp_group, _pp_group, _dp_group, _ep_group) if g is not None]
    _layout = ParallelLayout()
    _tp_group = _pp_group = _dp_group = _ep_group = None
    _tp_ranks = _pp_ranks = _dp_ranks = _ep_ranks = (0,)
    if groups:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for g in groups:
                try:
                    dist.destroy_process_group(g)
                except Exception:  # noqa: BLE001 - best effort; some backends refuse per-group teardown
                    pass
