"""Interleaved multi-step under pipeline parallelism: the order in which the engine core
launches further passes. A stage runs its queue in order and a pass waits on the GPU for its
batch's previous pass, so two passes of one batch queued back to back stall every stage for a
trip round the pipeline. This drives `next_further_pass` as EngineCore does (launch while it
names a batch, then report the oldest pass) and checks the launch sequence."""
from __future__ import annotations

from collections import deque

from braid.engine.core import PASSES_AHEAD, LaunchedBatch, next_further_pass


class Engine:
    """EngineCore's bookkeeping without a model: batches, launches, reports in launch order."""

    def __init__(self, shares: int) -> None:
        self.shares, self.in_flight, self.report_order, self.launches = shares, [], deque(), []

    def start(self, name: str, passes: int) -> None:  # EngineCore._launch: the first pass
        batch = LaunchedBatch(name, pending=deque([name]), to_launch=passes - 1, last_launch=len(self.launches))
        self.launches.append(name)
        self.in_flight.append(batch)
        self.report_order.append(batch)

    def launch_further(self) -> None:  # EngineCore._launch_further_passes
        while (batch := next_further_pass(self.in_flight, len(self.launches), self.shares)) is not None:
            batch.pending.append(batch.scheduler_output)
            batch.to_launch -= 1
            batch.last_launch = len(self.launches)
            self.launches.append(batch.scheduler_output)
            self.report_order.append(batch)

    def report(self) -> str:  # EngineCore._report_next_pass
        batch = self.report_order.popleft()
        batch.pending.popleft()
        if not batch.pending and not batch.to_launch:
            self.in_flight.remove(batch)
        return batch.scheduler_output


def test_shares_launch_round_robin_and_never_twice_in_a_row():
    engine = Engine(shares=5)
    for name in "ABCDE":
        engine.start(name, passes=8)
        engine.launch_further()
    while engine.report_order:
        engine.report()
        engine.launch_further()
    seq = "".join(engine.launches)
    assert sorted(seq) == sorted("ABCDE" * 8)
    assert seq == "ABCDE" * 8  # strict round-robin: each pass queued behind one of every other share


def test_passes_run_ahead_of_their_reports_once_every_share_has_launched():
    engine = Engine(shares=3)
    for name in "ABC":
        engine.start(name, passes=4)
        engine.launch_further()
    # Before any report: every share has a second pass queued, one of each share in between.
    assert "".join(engine.launches) == "ABCABC"
    assert all(len(b.pending) == PASSES_AHEAD for b in engine.in_flight)


def test_a_new_batch_waits_its_turn_for_its_second_pass():
    """A batch that replaces a finished one launches its second pass only after the other
    shares have each launched one since its first (not right behind it)."""
    engine = Engine(shares=3)
    for name in "ABC":
        engine.start(name, passes=2)
        engine.launch_further()
    assert "".join(engine.launches) == "ABCABC"
    assert engine.report() == "A" and engine.report() == "B" and engine.report() == "C"
    assert engine.report() == "A"  # A is done: a new batch takes its share
    engine.start("D", passes=3)
    engine.launch_further()
    assert "".join(engine.launches[6:]) == "D"  # not "DD"
    engine.report()  # B's last pass
    engine.start("E", passes=3)
    engine.launch_further()
    assert "".join(engine.launches[6:]) == "DE"
    engine.report()  # C's last pass
    engine.start("F", passes=3)
    engine.launch_further()
    assert "".join(engine.launches[6:]) == "DEFDEF"


def test_fewer_batches_than_shares_wait_for_reports():
    """The tail of a run: one batch left. It never has two passes out (nothing could run
    between them); each further pass is launched on the previous one's report."""
    engine = Engine(shares=4)
    engine.start("A", passes=4)
    engine.launch_further()
    assert engine.launches == ["A"]
    for n in range(2, 5):
        engine.report()
        engine.launch_further()
        assert engine.launches == ["A"] * n
