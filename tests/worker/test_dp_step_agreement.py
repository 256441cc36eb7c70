"""Data-parallel replicas agree on each step (MoE padding, CUDA-graph use, the dual-batch-overlap
vote) in one all-reduce: every collective here is a host sync across replicas, so DBO's auto
policy, when it does not split, must cost no more than DBO off."""
from types import SimpleNamespace

import pytest
import torch

from braid.worker.model_runner import ModelRunner


class Runner:
    """What ModelRunner._agree_step reads, with a counted all-reduce standing in for the group."""
    _agree_step = ModelRunner._agree_step

    def __init__(self, enable_dbo: bool, pads: bool, others: list[int]) -> None:
        self.config = SimpleNamespace(overlap=SimpleNamespace(enable_dbo=enable_dbo))
        self._dp_pads_moe, self._dp_vote_group, self.device = pads, object(), torch.device("cpu")
        self.others = others  # another replica's (no_split, tokens, no_graph)
        self._dp_tokens = self._dbo_dp_tokens = None


@pytest.mark.parametrize("enable_dbo,pads,reduces", [(True, True, 1), (True, False, 1), (False, True, 1),
                                                     (False, False, 0)])
def test_one_all_reduce_per_step(monkeypatch, enable_dbo, pads, reduces):
    calls = []

    def all_reduce(tensor, op=None, group=None):
        calls.append(tensor.tolist())
        tensor.copy_(torch.maximum(tensor, torch.tensor(runner.others)))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    runner = Runner(enable_dbo, pads, others=[0, 90, 1])  # the other replica: wants to split, 90 tokens, no graph
    split = object()
    use_graph, agreed_split = runner._agree_step(40, True, split if enable_dbo else None)
    assert len(calls) == reduces
    if pads:  # pad to the larger replica; graphs only if both can
        assert (runner._dp_tokens, runner._dbo_dp_tokens, use_graph) == (90, 45, False)
    else:
        assert (runner._dp_tokens, runner._dbo_dp_tokens, use_graph) == (None, None, True)
    assert agreed_split is (split if enable_dbo else None)
    if enable_dbo:  # this replica votes no: nobody splits
        runner.others = [0, 10, 0]
        assert runner._agree_step(40, True, None)[1] is None


class IdleRunner(Runner):
    """A replica with nothing scheduled, CUDA graphs captured (stand-ins that record replays)."""
    _dummy_forward = ModelRunner._dummy_forward

    def __init__(self, expert_parallel: bool) -> None:
        from braid.observe.trace import NULL_TRACER

        super().__init__(enable_dbo=False, pads=expert_parallel, others=[1, 24, 0])
        self.config.parallel = SimpleNamespace(enable_expert_parallel=expert_parallel)
        self.tracer = NULL_TRACER
        self.idle_replays = []
        self.cuda_graphs = SimpleNamespace(run_idle=self.idle_replays.append)


@pytest.mark.parametrize("expert_parallel", [True, False], ids=["ep-allgather", "dense"])
def test_an_idle_replica_replays_the_agreed_bucket_or_nothing(monkeypatch, expert_parallel):
    """Under expert parallelism an idle replica joins every pass's MoE collectives at the
    busiest replica's size; without it (a dense model, or experts replicated) no collective
    spans replicas and it runs nothing (it had replayed a graph for None rows and crashed)."""
    runner = IdleRunner(expert_parallel)
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda t, op=None, group=None: t.copy_(torch.maximum(t, torch.tensor(runner.others))))
    runner._dummy_forward(num_passes=3)
    assert runner.idle_replays == ([24, 24, 24] if expert_parallel else [])
