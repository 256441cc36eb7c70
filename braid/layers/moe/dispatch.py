"""Moving tokens to their experts' ranks and back (expert parallelism): the
prepare/finalize pair of an MoE layer.

dispatch: every (token, expert) pair's row goes to the EP rank that holds the
expert — pair counts are exchanged first (all_to_all_single of ep_size ints), then
the rows, local expert ids and router weights. combine: the experts' weighted
outputs go back the same way, reversed, and are summed per token.

Both accept async_op=True and then return a hook to wait on before the result may
be read (the seam dual-batch overlap will use); the counts exchange stays
synchronous (the host needs the split sizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass
class Dispatched:
    """What arrived at this rank: one row per pair, with its local expert and weight."""
    hidden: torch.Tensor          # [R, H]
    expert_ids: torch.Tensor      # [R] local expert index
    weights: torch.Tensor         # [R] fp32
    # Needed to send the outputs back.
    order: torch.Tensor           # the sender's pairs in the order they were sent
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int
    top_k: int


def _wait_all(works) -> Callable[[], None]:
    def wait() -> None:
        for w in works:
            w.wait()
    return wait


class AllToAllDispatcher:
    def __init__(self, group, ep_size: int, experts_per_rank: int) -> None:
        self.group, self.ep_size, self.experts_per_rank = group, ep_size, experts_per_rank

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 async_op: bool = False) -> tuple[Dispatched, Callable[[], None]]:
        num_tokens, top_k = topk_ids.shape
        flat = topk_ids.reshape(-1)
        dest = torch.div(flat, self.experts_per_rank, rounding_mode="floor")
        order = torch.sort(dest, stable=True).indices
        send_counts_t = torch.bincount(dest, minlength=self.ep_size)
        recv_counts_t = torch.empty_like(send_counts_t)
        dist.all_to_all_single(recv_counts_t, send_counts_t, group=self.group)
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        num_recv = sum(recv_counts)
        send_rows = x[torch.div(order, top_k, rounding_mode="floor")]
        send_local = flat[order] - dest[order] * self.experts_per_rank
        send_w = topk_weights.reshape(-1)[order].float()
        hidden = x.new_empty((num_recv, x.shape[1]))
        expert_ids = flat.new_empty(num_recv)
        weights = send_w.new_empty(num_recv)
        works = [dist.all_to_all_single(out, inp, recv_counts, send_counts, group=self.group, async_op=True)
                 for out, inp in ((hidden, send_rows), (expert_ids, send_local), (weights, send_w))]
        result = Dispatched(hidden, expert_ids, weights, order, send_counts, recv_counts, num_tokens, top_k)
        wait = _wait_all(works)
        if not async_op:
            wait()
        return result, wait

    def combine(self, expert_out: torch.Tensor, d: Dispatched,
                async_op: bool = False) -> tuple[torch.Tensor, Callable[[], None]]:
        """expert_out [R, H]: the weighted output of each received row. Returns [T, H]
        (valid once the hook has run, when async_op)."""
        back = expert_out.new_empty((len(d.order), expert_out.shape[1]))
        work = dist.all_to_all_single(back, expert_out.contiguous(), d.send_counts, d.recv_counts,
                                      group=self.group, async_op=True)
        out = torch.zeros((d.num_tokens, expert_out.shape[1]), dtype=torch.float32, device=expert_out.device)

        def wait() -> None:
            work.wait()
            out.index_add_(0, torch.div(d.order, d.top_k, rounding_mode="floor"), back.float())

        if not async_op:
            wait()
        return out, wait
