"""Dual-batch overlap's split: balanced by tokens, a straddling request continues in the
second micro-batch with the right context lengths, no split that would leave a half
empty (also when padding is counted), the threshold policy, and data-parallel ranks
that disagree all fall back together (gloo ranks)."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braid.worker.ubatch_split import StepAgreement, agree_on_step, should_try_split, split_ubatches


def test_cut_between_requests_and_straddling():
    first, second = split_ubatches([2, 2], [10, 7])
    assert (first.req_start, first.req_end, first.query_lens, first.seq_lens) == (0, 1, (2,), (10,))
    assert (second.req_start, second.req_end, second.query_lens, second.seq_lens) == (1, 2, (2,), (7,))
    # One 9-token prefill chunk ending at context 20: 5 tokens then a 4-token continuation.
    first, second = split_ubatches([9], [20])
    assert (first.query_lens, first.seq_lens, second.query_lens, second.seq_lens) == ((5,), (16,), (4,), (20,))
    assert (first.req_start, first.req_end, second.req_start, second.req_end) == (0, 1, 0, 1)


def test_no_split_when_a_half_would_be_empty():
    assert split_ubatches([1], [5]) is None              # one token
    assert split_ubatches([], []) is None
    assert split_ubatches([1, 1, 1], [4, 4, 4], num_padded_tokens=8) is None  # cut 4: second half all padding
    assert split_ubatches([1] * 5, [4] * 5, num_padded_tokens=8) is not None
    with pytest.raises(ValueError, match="smaller than the batch"):
        split_ubatches([3], [3], num_padded_tokens=2)


def test_threshold_policy():
    assert should_try_split(32, decode_only=True) and not should_try_split(31, decode_only=True)
    assert should_try_split(512, decode_only=False) and not should_try_split(511, decode_only=False)
    assert should_try_split(8, True, decode_threshold=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 100)), min_size=1, max_size=12),
       st.integers(0, 16))
def test_split_properties(requests, extra_padding):
    query_lens = [q for q, _ in requests]
    seq_lens = [q + c for q, c in requests]  # c tokens already computed
    total = sum(query_lens)
    split = split_ubatches(query_lens, seq_lens, total + extra_padding)
    cut = (total + extra_padding + 1) // 2
    if cut >= total:
        assert split is None
        return
    first, second = split
    assert (first.token_start, first.token_end, second.token_start, second.token_end) == (0, cut, cut, total)
    assert sum(first.query_lens) == first.num_tokens and sum(second.query_lens) == second.num_tokens
    assert first.num_tokens >= 1 and second.num_tokens >= 1
    if extra_padding == 0:
        assert abs(first.num_tokens - second.num_tokens) <= 1
    # Every request's tokens are covered once, its context ends where it did.
    per_request: dict[int, int] = {}
    for mb in (first, second):
        for j, q in enumerate(mb.query_lens):
            per_request[mb.req_start + j] = per_request.get(mb.req_start + j, 0) + q
    assert per_request == dict(enumerate(query_lens))
    assert second.seq_lens[-1] == seq_lens[-1] and first.seq_lens[: first.req_end - 1] == tuple(seq_lens[: first.req_end - 1])
    if first.req_end - 1 == second.req_start:  # the straddler: its first part ends where the second part begins
        i = second.req_start
        assert first.seq_lens[-1] == seq_lens[i] - second.query_lens[0]


def _vote_worker(rank, world_size, init_file, votes, tokens, graphs, out_dir):
    import torch.distributed as dist

    from tests.distributed.test_tensor_parallel import _init_dist

    _init_dist(rank, world_size, init_file)
    try:
        agreed = agree_on_step(votes[rank], tokens[rank], graphs[rank], group=dist.group.WORLD)
        with open(os.path.join(out_dir, f"vote{rank}"), "w") as f:
            f.write(f"{int(agreed.split)} {agreed.most_tokens} {int(agreed.graph)}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("votes,graphs,want", [([True, True], [True, True], "1 70 1"),
                                               ([True, False], [True, True], "0 70 1"),
                                               ([False, False], [False, True], "0 70 0")],
                         ids=["agree", "disagree", "one-rank-without-graph"])
def test_dp_ranks_split_and_replay_graphs_only_together(tmp_path, votes, graphs, want):
    """One all-reduce carries the split vote, the padded size and the CUDA-graph wish."""
    from tests.distributed.test_tensor_parallel import _spawn

    _spawn(_vote_worker, 2, str(tmp_path / "init"), votes, [40, 70], graphs, str(tmp_path))
    for rank in range(2):
        assert (tmp_path / f"vote{rank}").read_text() == want
    assert agree_on_step(True, 9, False) == StepAgreement(True, 9, False)
