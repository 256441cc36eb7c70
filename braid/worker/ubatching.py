"""Dual-batch overlap's execution: two micro-batches on two threads, exactly one running
on the CPU at a time, handing the turn over at the yield points the layers call.

Each thread launches its micro-batch's work on one of two CUDA streams, compute or
communication; the switch functions move a thread between them, ordering the work
with GPU events so that dependencies hold only within a micro-batch. While micro-batch
A's all-to-all runs on the communication stream, micro-batch B's compute is launched on
the compute stream: the GPU overlaps them.

Turn-taking: a thread waits on its own CPU event and wakes the other by setting the
other's. A thread that finishes (or fails) passes the turn on for good, so the other
never waits on it again; an error in either thread is raised to the caller after both
have stopped. Each thread has its own forward context (forward_context is per thread).

Timeline: with a tracer (traced GPU runs) each micro-batch's work between two switches
is one GPU span on the stream it ran on, "ubatch0 compute", "ubatch1 comm", ..., so the
trace shows both streams of both micro-batches and `braid trace summarize` can measure
how much communication ran under compute (trace_summary.dbo_overlap).

Receive hooks: a micro-batch that started an asynchronous receive registers the wait
for it with `register_recv_hook`; the *other* micro-batch runs it at its next yield,
just before handing the turn back, so the wait never blocks the thread that could be
launching work meanwhile.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch

_local = threading.local()


class _Streams:
    """The compute and communication streams (None on CPU: switches are no-ops)."""

    def __init__(self, device: torch.device | None) -> None:
        on_gpu = device is not None and device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if on_gpu else None
        self.comm = torch.cuda.Stream(device) if on_gpu else None


class UBatchContext:
    def __init__(self, ubatch_id: int, group: "UBatchGroup") -> None:
        self.id = ubatch_id
        self.group = group
        self.wake = threading.Event()
        self.done = False
        self.pending_hooks: list[Callable[[], Any]] = []
        self.yields = 0  # counted so tests can check both micro-batches yield alike
        self._segment = None       # the open timeline span of this micro-batch's current work
        self._segment_kind = "compute"

    @property
    def other(self) -> "UBatchContext":
        return self.group.contexts[1 - self.id]

    # ---- timeline ----------------------------------------------------------------------
    def _open_segment(self, kind: str) -> None:
        self._segment_kind = kind
        tracer = self.group.tracer
        if tracer is not None:
            self._segment = tracer.gpu_span(f"ubatch{self.id} {kind}")
            self._segment.__enter__()

    def _close_segment(self) -> str:
        if self._segment is not None:
            self._segment.__exit__(None, None, None)
            self._segment = None
        return self._segment_kind

    # ---- turn-taking -----------------------------------------------------------------
    def yield_(self) -> None:
        """Let the other micro-batch run until it yields back (or finishes)."""
        kind = self._close_segment()  # the other's work on this stream is not this segment's
        self._hand_over()
        self._open_segment(kind)

    def _hand_over(self) -> None:
        self.yields += 1
        self._run_hooks()
        if self.other.done:
            return
        self.wake.clear()
        self.other.wake.set()
        self.wake.wait()
        if self.group.error is not None:  # the other micro-batch failed: unwind this one
            raise _Aborted()

    def register_recv_hook(self, hook: Callable[[], Any]) -> None:
        """The other micro-batch runs `hook` (e.g. waits for this one's receive) at its next yield."""
        if self.other.done:
            hook()
        else:
            self.other.pending_hooks.append(hook)

    def _run_hooks(self) -> None:
        hooks, self.pending_hooks = self.pending_hooks, []
        for hook in hooks:
            hook()

    # ---- streams ---------------------------------------------------------------------
    def _move(self, src, dst, kind: str, hand_over: bool) -> None:
        """Capture this micro-batch's work so far on `src`, let the other micro-batch run (if
        `hand_over`), then continue on `dst` after that work (and after nothing of the other's)."""
        self._close_segment()
        event = None
        if src is not None:
            event = torch.cuda.Event()
            event.record(src)
        if hand_over:
            self._hand_over()
        if event is not None:
            dst.wait_event(event)
            torch.cuda.set_stream(dst)
        self._open_segment(kind)

    def switch_to_comm(self) -> None:
        self._move(self.group.streams.compute, self.group.streams.comm, "comm", hand_over=False)

    def switch_to_compute(self) -> None:
        self._move(self.group.streams.comm, self.group.streams.compute, "compute", hand_over=False)

    def yield_and_switch_from_compute_to_comm(self) -> None:
        """Before a collective: the other micro-batch launches its compute meanwhile."""
        self._move(self.group.streams.compute, self.group.streams.comm, "comm", hand_over=True)

    def yield_and_switch_from_comm_to_compute(self) -> None:
        """After a collective: this micro-batch's compute then waits for its own communication only."""
        self._move(self.group.streams.comm, self.group.streams.compute, "compute", hand_over=True)


class _Aborted(BaseException):
    """Unwinds a thread whose partner failed (the partner's error is the one raised)."""


class UBatchGroup:
    """Reusable: the streams are made once; each run() starts with fresh micro-batch state."""

    def __init__(self, device: torch.device | None = None, tracer=None) -> None:
        self.streams = _Streams(device)
        # Traced GPU runs: per-segment GPU spans (None: no timeline, no cost).
        self.tracer = tracer if self.streams.compute is not None else None
        self.contexts: list[UBatchContext] = []
        self.error: BaseException | None = None

    def run(self, fns: list[Callable[[], Any]], require_equal_yields: bool = False) -> list[Any]:
        """Run fns[0] and fns[1] as micro-batches 0 and 1 (0 starts); return their results.
        require_equal_yields: the model's micro-batches must hand over at the same points
        (their collectives pair up across ranks); a mismatch is an error, not a hang later."""
        if len(fns) != 2:
            raise ValueError("dual-batch overlap runs exactly two micro-batches")
        self.contexts = [UBatchContext(0, self), UBatchContext(1, self)]
        self.error = None
        results: list[Any] = [None, None]
        stream = torch.cuda.current_stream() if self.streams.compute is not None else None
        inference = torch.is_inference_mode_enabled()  # grad modes are per thread: carry the caller's

        def body(i: int) -> None:
            ctx = self.contexts[i]
            _local.ctx = ctx
            if stream is not None:
                torch.cuda.set_stream(stream)
            try:
                ctx.wake.wait()
                if self.error is None:
                    ctx._open_segment("compute")
                    with torch.inference_mode(inference):
                        results[i] = fns[i]()
            except _Aborted:
                pass
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                if self.error is None:
                    self.error = e
            finally:
                ctx._close_segment()
                ctx.done = True
                ctx._run_hooks()
                ctx.other.wake.set()  # the turn passes on for good
                _local.ctx = None

        threads = [threading.Thread(target=body, args=(i,), name=f"braid-ubatch-{i}", daemon=True)
                   for i in range(2)]
        for t in threads:
            t.start()
        self.contexts[0].wake.set()
        for t in threads:
            t.join()
        if stream is not None:
            torch.cuda.set_stream(stream)
        if self.error is not None:
            raise self.error
        yields = [c.yields for c in self.contexts]
        if require_equal_yields and yields[0] != yields[1]:
            raise RuntimeError(f"the micro-batches yielded {yields[0]} and {yields[1]} times: their collectives "
                               f"do not pair up")
        return results


def current_ubatch() -> UBatchContext | None:
    """This thread's micro-batch (None outside dual-batch overlap): layers call its yields."""
    return getattr(_local, "ctx", None)
