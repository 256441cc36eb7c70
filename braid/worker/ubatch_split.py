"""Dual-batch overlap's split of one step into two micro-batches (pure; no torch state).

The cut balances tokens: micro-batch 0 takes the first ceil(T / 2) tokens of the flat
batch (of the padded count when the step is padded, e.g. to a CUDA-graph size), in
batch order. A request that straddles the cut runs in both: its first part in
micro-batch 0, the rest in micro-batch 1 as a chunked-prefill continuation that
attends to what the first part wrote. No split when either half would hold no real
token. Every data-parallel rank must take the same decision (their MoE collectives
pair up), so `agree_on_step` turns the local votes into one, in the same single all-reduce
that agrees on the step's padded size and CUDA-graph use (one host sync per step, DBO or not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class MicroBatch:
    token_start: int                 # tokens [token_start, token_end) of the flat batch
    token_end: int
    req_start: int                   # requests [req_start, req_end) of the batch
    req_end: int
    query_lens: tuple[int, ...]      # per request of this micro-batch: tokens it computes here
    seq_lens: tuple[int, ...]        # per request: context length once these tokens are in

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


def should_try_split(num_tokens: int, decode_only: bool, decode_threshold: int = 32,
                     prefill_threshold: int = 512) -> bool:
    """The `threshold` policy: decode batches of at least decode_threshold tokens, other
    batches of at least prefill_threshold tokens."""
    return num_tokens >= (decode_threshold if decode_only else prefill_threshold)


def split_ubatches(query_lens: Sequence[int], seq_lens: Sequence[int],
                   num_padded_tokens: int | None = None) -> tuple[MicroBatch, MicroBatch] | None:
    """query_lens[i] tokens of request i run this step, ending at context length seq_lens[i].
    Returns the two micro-batches, or None when the cut would leave one without a real token."""
    if len(query_lens) != len(seq_lens):
        raise ValueError("query_lens and seq_lens must have one entry per request")
    total = sum(query_lens)
    padded = total if num_padded_tokens is None else num_padded_tokens
    if padded < total:
        raise ValueError(f"num_padded_tokens ({padded}) is smaller than the batch ({total} tokens)")
    cut = (padded + 1) // 2
    if cut <= 0 or cut >= total:
        return None
    start = 0
    for i, (q, s) in enumerate(zip(query_lens, seq_lens)):
        if start + q >= cut:  # request i holds the cut (ends exactly on it, or straddles it)
            head = cut - start  # its tokens in micro-batch 0
            first = MicroBatch(0, cut, 0, i + 1, tuple(query_lens[:i]) + (head,),
                               tuple(seq_lens[:i]) + (s - (q - head),))
            if head == q:   # the cut falls between requests
                rest_q, rest_s, second_req = tuple(query_lens[i + 1:]), tuple(seq_lens[i + 1:]), i + 1
            else:           # straddles: the rest continues in micro-batch 1
                rest_q = (q - head,) + tuple(query_lens[i + 1:])
                rest_s = (s,) + tuple(seq_lens[i + 1:])
                second_req = i
            second = MicroBatch(cut, total, second_req, len(query_lens), rest_q, rest_s)
            return first, second
        start += q
    return None  # unreachable: cut < total


@dataclass(frozen=True)
class StepAgreement:
    split: bool        # every rank voted to split
    most_tokens: int   # the largest rank's token count (what MoE inputs pad to)
    graph: bool        # every rank can replay a CUDA graph


def agree_on_step(wants_split: bool, num_tokens: int, can_graph: bool = True, group=None,
                  device=None) -> StepAgreement:
    """Every data-parallel rank's split vote, token count and CUDA-graph wish in one
    all-reduce: split only if all want to, replay graphs only if all can, pad to the largest
    count. Without a group (one rank) the local values stand. `device`: where the group's
    backend reduces (the GPU for NCCL, None for gloo)."""
    if group is None:
        return StepAgreement(wants_split, num_tokens, can_graph)
    import torch
    import torch.distributed as dist

    # MAX of (1 - vote) is 0 only if every rank said yes; MAX of the token counts.
    values = torch.tensor([0 if wants_split else 1, num_tokens, 0 if can_graph else 1], dtype=torch.int64,
                          device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    no_split, most_tokens, no_graph = values.tolist()
    return StepAgreement(no_split == 0, most_tokens, no_graph == 0)
