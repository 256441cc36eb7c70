"""Moving tokens to their experts' ranks and back (expert parallelism): the
prepare/finalize pair of an MoE layer, in two forms (--all2all-backend).

all_to_all (AllToAllDispatcher): every (token, expert) pair's row goes to the EP rank
that holds the expert — pair counts are exchanged first (all_to_all_single of ep_size
ints, read by the host), then the rows, local expert ids and router weights. combine:
the experts' weighted outputs go back the same way, reversed, and are summed per token.

allgather_reducescatter (AllGatherDispatcher): every rank pads its tokens to one
agreed count and all-gathers every rank's rows with their expert ids and weights (one
packed collective); each rank runs its own experts over all of them (other ranks'
experts are skipped) and a reduce-scatter sums the partial outputs back to the
tokens' own ranks. Bytes moved: ep x T rows in, against k x T pair rows for
all-to-all, so no more for ep <= top-k; shapes never depend on the routing, so no
host sync and CUDA graphs can capture it.

Both accept async_op=True and then return a hook to wait on before the result may
be read (the seam dual-batch overlap uses); all-to-all's counts exchange stays
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


@dataclass
class Gathered:
    """Every EP rank's tokens, padded to one count each: rows of rank r are [r*P, (r+1)*P)."""
    hidden: torch.Tensor          # [ep * P, H]
    topk_ids: torch.Tensor        # [ep * P, k] this rank's local expert ids; others' experts out of range
    topk_weights: torch.Tensor    # [ep * P, k] fp32
    num_tokens: int               # this rank's real tokens (<= P)
    padded_tokens: int            # P


def _gather(group, ep_size: int, send: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
    out = send.new_empty((ep_size * send.shape[0],) + tuple(send.shape[1:]))
    if dist.get_backend(group) == "nccl":
        work = dist.all_gather_into_tensor(out, send, group=group, async_op=True)
        return out, work.wait
    # gloo (CPU tests) has no all_gather_into_tensor: gather into the ranks' chunks of `out`.
    parts = list(out.chunk(ep_size))
    work = dist.all_gather(parts, send, group=group, async_op=True)
    return out, work.wait


class AllGatherDispatcher:
    def __init__(self, group, ep_size: int, first_expert: int) -> None:
        self.group, self.ep_size, self.first_expert = group, ep_size, first_expert

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, padded_tokens: int,
                 async_op: bool = False) -> tuple[Gathered, Callable[[], None]]:
        num_tokens, top_k = topk_ids.shape
        if num_tokens > padded_tokens:
            raise RuntimeError(f"expert parallelism: {num_tokens} tokens exceed the agreed padding {padded_tokens}")
        # One int32 row per token: the hidden state's bits, its k expert ids, its k weights' bits.
        hidden_words = x.shape[1] * x.element_size() // 4
        send = torch.zeros((padded_tokens, hidden_words + 2 * top_k), dtype=torch.int32, device=x.device)
        send[:num_tokens, :hidden_words] = x.contiguous().view(torch.int32)
        send[:num_tokens, hidden_words:hidden_words + top_k] = topk_ids
        send[num_tokens:, hidden_words:hidden_words + top_k] = -1  # padding: no expert anywhere
        send[:num_tokens, hidden_words + top_k:] = topk_weights.float().view(torch.int32)
        out, wait_gather = _gather(self.group, self.ep_size, send)
        result = Gathered(None, None, None, num_tokens, padded_tokens)

        def wait() -> None:
            wait_gather()
            result.hidden = out[:, :hidden_words].view(x.dtype)
            ids = out[:, hidden_words:hidden_words + top_k].long()
            # Global -> this rank's expert ids; padding (-1) and other ranks' experts fall outside.
            result.topk_ids = torch.where(ids >= 0, ids - self.first_expert, torch.full_like(ids, -1))
            result.topk_weights = out[:, hidden_words + top_k:].contiguous().view(torch.float32)

        if not async_op:
            wait()
        return result, wait

    def combine(self, expert_out: torch.Tensor, g: Gathered,
                async_op: bool = False) -> tuple[torch.Tensor, Callable[[], None]]:
        """expert_out [ep * P, H]: this rank's experts' weighted sums for every gathered token.
        Returns this rank's [T, H] (valid once the hook has run, when async_op)."""
        expert_out = expert_out.contiguous()
        p = g.padded_tokens
        if dist.get_backend(self.group) == "nccl":
            summed = expert_out.new_empty((p, expert_out.shape[1]))
            work = dist.reduce_scatter_tensor(summed, expert_out, op=dist.ReduceOp.SUM, group=self.group,
                                              async_op=True)
            mine = summed
        else:  # gloo has no reduce-scatter: sum everything in place, keep this rank's rows
            work = dist.all_reduce(expert_out, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            rank = dist.get_rank(self.group)
            mine = expert_out[rank * p:(rank + 1) * p]
        if not async_op:
            work.wait()
        return mine[:g.num_tokens], work.wait
