"""Dual-batch overlap's two threads: they alternate at every yield, exactly one runs at a
time, a micro-batch with more yields than the other still finishes, a receive hook runs
on the other thread at its next yield, each thread keeps its own forward context, and
an error in either is raised to the caller without a hang."""
import threading
import time

import pytest

from braid.forward_context import ForwardContext, get_forward_context, set_forward_context
from braid.worker.ubatching import UBatchGroup, current_ubatch


def _run(fns, timeout=10.0):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", _capture(lambda: UBatchGroup().run(fns))))
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "micro-batches hung"
    result, error = out["r"]
    if error is not None:
        raise error
    return result


def _capture(fn):
    try:
        return fn(), None
    except BaseException as e:  # noqa: BLE001
        return None, e


def test_alternate_one_at_a_time_and_return_results():
    order, running = [], [0]

    def micro(i, steps):
        def fn():
            for step in range(steps):
                assert running[0] == 0, "both micro-batches ran at once"
                running[0] = 1
                order.append((i, step))
                time.sleep(0.002)
                running[0] = 0
                current_ubatch().yield_()
            return i * 10
        return fn

    assert _run([micro(0, 3), micro(1, 3)]) == [0, 10]
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    order.clear()
    assert _run([micro(0, 4), micro(1, 1)]) == [0, 10]  # unequal yields still finish
    assert sorted(order) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    with pytest.raises(RuntimeError, match="yielded 2 and 1 times"):  # unless they must pair up
        UBatchGroup().run([micro(0, 2), micro(1, 1)], require_equal_yields=True)


def test_recv_hook_runs_on_the_other_thread_at_its_next_yield():
    seen = []

    def first():
        current_ubatch().register_recv_hook(lambda: seen.append(("hook", threading.current_thread().name)))
        current_ubatch().yield_()
        seen.append(("first resumed", None))

    def second():
        seen.append(("second runs", None))
        current_ubatch().yield_()

    _run([first, second])
    assert seen == [("second runs", None), ("hook", "braid-ubatch-1"), ("first resumed", None)]


def test_each_thread_keeps_its_forward_context():
    def fn(tag):
        def run():
            with set_forward_context(ForwardContext(tag, [], None)):
                for _ in range(3):
                    current_ubatch().yield_()
                    assert get_forward_context().attn_metadata == tag
            return tag
        return run

    assert _run([fn("a"), fn("b")]) == ["a", "b"]


@pytest.mark.parametrize("failing", [0, 1])
def test_an_error_in_either_micro_batch_is_raised_without_a_hang(failing):
    def fn(i):
        def run():
            current_ubatch().yield_()
            if i == failing:
                raise RuntimeError(f"micro-batch {i} failed")
            for _ in range(5):
                current_ubatch().yield_()
        return run

    with pytest.raises(RuntimeError, match=f"micro-batch {failing} failed"):
        _run([fn(0), fn(1)])


@pytest.mark.gpu
def test_stream_switches_keep_each_micro_batch_in_order_on_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def fn(i):
        def run():
            ctx = current_ubatch()
            x = torch.full((2048, 2048), float(i + 1), device="cuda")
            y = x @ x                                    # compute stream
            ctx.yield_and_switch_from_compute_to_comm()
            z = y + 1                                    # "communication" stream, after y
            ctx.yield_and_switch_from_comm_to_compute()
            return float((z * 2).mean())                 # compute stream, after z
        return run

    got = UBatchGroup(torch.device("cuda")).run([fn(0), fn(1)])
    assert got == [2 * (2048 * 1 + 1), 2 * (2048 * 4 + 1)]


@pytest.mark.gpu
def test_traced_micro_batches_show_both_streams_and_an_overlap_figure(tmp_path):
    import torch

    from braid.observe.trace import make_tracer
    from braid.observe.trace_summary import summarize

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tracer = make_tracer(str(tmp_path), "worker-0")

    def fn(i):
        def run():
            ctx = current_ubatch()
            x = torch.full((4096, 4096), float(i + 1), device="cuda")
            for _ in range(3):
                x = (x @ x).clamp_(max=1.0)              # compute
                ctx.yield_and_switch_from_compute_to_comm()
                x = x + 1                                # "communication"
                ctx.yield_and_switch_from_comm_to_compute()
            return float(x.mean())
        return run

    group = UBatchGroup(torch.device("cuda"), tracer)
    assert group.run([fn(0), fn(1)]) == group.run([fn(0), fn(1)])
    tracer.close()
    s = summarize(str(tmp_path))
    names = set(s["gpu"]["span_names"])
    assert {"ubatch0 compute", "ubatch1 compute", "ubatch0 comm", "ubatch1 comm"} <= names
    dbo = s["gpu"]["dbo_overlap"]
    assert dbo["compute_ms"] > 0 and dbo["comm_ms"] > 0 and dbo["efficiency"] is not None
