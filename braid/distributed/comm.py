"""Collectives used by model layers, in one place.

Tensor-parallel layers call these and nothing else; with one TP rank they are
identities (no torch.distributed needed). With tp_size > 1 they run over the
TP process group from parallel_state (gloo on CPU, NCCL on GPU: whatever the
group was created with). Under dual-batch overlap every collective is where a
micro-batch hands the turn to the other (`overlapped`): it yields before (moving to
the communication stream) and after (back to compute), with no change in the layers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from braid.distributed.parallel_state import get_tp_group, get_tp_size
from braid.worker.ubatching import current_ubatch


def overlapped(collective):
    """Run `collective()` at a dual-batch-overlap yield point (plainly outside DBO)."""
    ubatch = current_ubatch()
    if ubatch is None:
        return collective()
    ubatch.yield_and_switch_from_compute_to_comm()
    out = collective()
    ubatch.yield_and_switch_from_comm_to_compute()
    return out


def _tp_group_or_raise():
    group = get_tp_group()
    if group is None:
        raise RuntimeError(
            f"tp_size is {get_tp_size()} but no TP process group exists; call init_model_parallel() first"
        )
    return group


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the TP group (RowParallelLinear outputs, vocab-parallel embedding).

    For tp > 1 the sum is written into x itself when it is contiguous (no
    allocation; the caller must not reuse x's old value) and the result is returned."""
    if get_tp_size() == 1:
        return x
    group = _tp_group_or_raise()
    if not x.is_contiguous():
        x = x.contiguous()
    overlapped(lambda: dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group))
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each TP rank's x along dim, in TP-rank order (vocab-parallel logits).
    All ranks' x must have the same shape."""
    tp_size = get_tp_size()
    if tp_size == 1:
        return x
    group = _tp_group_or_raise()
    if dim < 0:
        dim += x.dim()
    if not 0 <= dim < x.dim():
        raise IndexError(f"all_gather dim out of range for a {x.dim()}-d tensor")
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        # One flat buffer [tp, *x.shape], then move the rank axis next to dim.
        out = torch.empty((tp_size,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        overlapped(lambda: dist.all_gather_into_tensor(out, x, group=group))
        return out.movedim(0, dim).reshape(x.shape[:dim] + (tp_size * x.shape[dim],) + x.shape[dim + 1:])
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    overlapped(lambda: dist.all_gather(parts, x, group=group))
    return torch.cat(parts, dim=dim)


def pp_send(tensors: list[torch.Tensor]) -> None:
    """Send tensors to the next pipeline stage (this rank's counterpart in the PP group)."""
    from braid.distributed.parallel_state import get_pp_group, get_pp_rank, get_pp_ranks

    dst = get_pp_ranks()[get_pp_rank() + 1]
    for t in tensors:
        dist.send(t.contiguous(), dst=dst, group=get_pp_group())


def pp_recv_into(tensors: list[torch.Tensor]) -> None:
    """Receive into these (contiguous) tensors from the previous pipeline stage."""
    from braid.distributed.parallel_state import get_pp_group, get_pp_rank, get_pp_ranks

    src = get_pp_ranks()[get_pp_rank() - 1]
    for t in tensors:
        dist.recv(t, src=src, group=get_pp_group())


def pp_recv(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Receive tensors of the given shapes from the previous pipeline stage."""
    from braid.distributed.parallel_state import get_pp_group, get_pp_rank, get_pp_ranks

    src = get_pp_ranks()[get_pp_rank() - 1]
    out = []
    for shape in shapes:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=src, group=get_pp_group())
        out.append(t)
    return out


def pp_isend_to_first_stage(tokens: torch.Tensor):
    """Multi-step under pipeline parallelism: the last stage's sampled ids [B] go to the first
    as soon as they are sampled. Returns the send's work (wait on it before dropping it)."""
    from braid.distributed.parallel_state import get_pp_group, get_pp_ranks

    return dist.isend(tokens.contiguous(), dst=get_pp_ranks()[0], group=get_pp_group())


def pp_irecv_from_last_stage(num_tokens: int, device: torch.device):
    """The first stage's side: (tokens [B], work); wait on the work before reading them (on
    NCCL the wait only orders the current stream after the receive: the host goes on)."""
    from braid.distributed.parallel_state import get_pp_group, get_pp_ranks

    tokens = torch.empty(num_tokens, dtype=torch.int64, device=device)
    return tokens, dist.irecv(tokens, src=get_pp_ranks()[-1], group=get_pp_group())
