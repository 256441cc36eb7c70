"""Step timeline: a Chrome / Perfetto trace of engine steps (CPU spans + CUDA-event GPU spans).

Use::

    tracer = make_tracer(trace_dir, "engine-core")   # trace_dir=None -> NullTracer (free)
    with tracer.cpu_span("step"):
        with tracer.cpu_span("launch"), tracer.gpu_span("forward"):
            model(...)
    tracer.counter("num_running", 12)
    tracer.close()                                    # or flush() now and then

Open the file in https://ui.perfetto.dev (or chrome://tracing), or run
`braid trace summarize DIR`.

Clock. Every timestamp is ``time.perf_counter_ns() / 1000`` (microseconds). On Linux
that is CLOCK_MONOTONIC, shared by all processes of one host, so the traces of the
frontend, the engine core and the worker ranks line up without any correction. (Traces
from different hosts do not line up.)

GPU spans. ``gpu_span`` records two timing CUDA events on the stream and never waits
for the GPU. Finished events are turned into trace events in batches: every
``resolve_every`` (default 64) spans the tracer asks which pending end events have
completed (``event.query()``, no blocking); ``flush()`` and ``close()`` wait for all of
them, and so does a span that finds 32x ``resolve_every`` still pending (a GPU that far
behind; it does not happen in a normal run). Events are pooled per device and reused. GPU
times are mapped onto the CPU clock through a reference event whose CPU time is known:
the first time a device is used (or ``calibrate_gpu()`` is called) the tracer
synchronises once, records an event and takes ``perf_counter`` around it; after that each
resolved batch re-bases the reference onto its newest event (so ``elapsed_time`` — a
float32 in ms — is always taken over short intervals), and the first span after ~1 s
without GPU spans on a device re-calibrates (spinning on ``query()`` for at most 200 us;
if the stream is busy it keeps the chained reference) so that clock drift and rounding do
not accumulate. Spans entered while the current stream is being captured into a CUDA
graph are skipped. Without CUDA ``gpu_span`` is a no-op (and CUDA is never initialised
by a process that only records CPU spans).

Cost when on: a CPU span is a small object, two clock reads and a list append (~1 us);
a GPU span adds two event records and a current-stream lookup. Spans of concurrent
asyncio tasks on one thread may overlap without nesting; keep spans within one
synchronous stretch of code.

Buffer and flush policy. Events are kept in memory until ``max_buffered_events``
(default 10,000 — about 1,000 engine steps) have accumulated; then, when the outermost
CPU span on a thread closes (between steps, not inside one), they are appended to the
file and dropped from memory. The flush is itself recorded as a CPU span named
``trace_flush`` so its cost shows in the timeline. If no outermost span closes, the
buffer is written anyway at 4x the limit. An automatic flush does not wait for the GPU
(spans still running are written by a later flush). The file always holds valid JSON after a flush:
events are appended one per line before a closing ``]}`` that is rewritten each time. Its
size is capped at ``max_file_bytes`` (default 2 GiB); past it the tracer stops recording
and logs a warning once. So memory stays bounded however long the run is; disk is
bounded by the cap. A process killed between flushes loses only the unflushed events
(the summarizer also reads a file whose tail was cut mid-write).

File: ``<trace_dir>/braid-trace-<process_name>-<pid>.json`` (process_name with anything
but ``[A-Za-z0-9._-]`` replaced by ``_``). A tracer made before a fork writes nothing from
the child: make one per process.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import sys
import threading
import weakref
from time import perf_counter_ns

logger = logging.getLogger(__name__)

__all__ = ["make_tracer", "Tracer", "NullTracer", "trace_file_name", "TRACE_FILE_PREFIX"]

TRACE_FILE_PREFIX = "braid-trace-"
_GPU_TID_BASE = 1_000_000_000          # synthetic thread ids of the GPU stream tracks
_TRAILER = b"\n]}\n"
_NULL = contextlib.nullcontext()       # the one object every NullTracer span returns


def trace_file_name(process_name: str, pid: int) -> str:
    return f"{TRACE_FILE_PREFIX}{re.sub(r'[^A-Za-z0-9._-]', '_', process_name)}-{pid}.json"


def make_tracer(trace_dir: str | None, process_name: str, **options) -> "Tracer | NullTracer":
    """A recording Tracer writing into trace_dir, or the shared NullTracer when trace_dir is None.
    options go to Tracer (max_buffered_events, max_file_bytes, resolve_every)."""
    if trace_dir is None:
        return NULL_TRACER
    from braid.observe import runtime_probes

    tracer = Tracer(trace_dir, process_name, **options)
    runtime_probes.install(tracer)  # garbage collections and Triton compiles as spans
    return tracer


class NullTracer:
    """Tracing off. Every method returns at once: no events, no clock reads, no CUDA calls;
    the spans return one shared nullcontext. (The only cost is the Python call itself, plus
    the dict Python builds for **args; guard expensive args with ``if tracer.enabled``.)"""

    __slots__ = ()
    enabled = False
    path = None

    def cpu_span(self, name, /, **args):
        return _NULL

    def gpu_span(self, name, stream=None):
        return _NULL

    def complete(self, name, t0_ns, t1_ns, /, **args):
        pass

    def instant(self, name, /, **args):
        pass

    def counter(self, name, value):
        pass

    def calibrate_gpu(self, device=None):
        pass

    def flush(self):
        pass

    def close(self):
        pass


NULL_TRACER = NullTracer()


class _CpuSpan:
    __slots__ = ("_tr", "_name", "_args", "_t0")

    def __init__(self, tr: "Tracer", name: str, args: dict | None) -> None:
        self._tr = tr
        self._name = name
        self._args = args

    def __enter__(self):
        loc = self._tr._local
        try:
            loc.depth += 1
        except AttributeError:                      # first span on this thread
            self._tr._init_thread()
            loc.depth = 1
        self._t0 = perf_counter_ns()
        return self

    def __exit__(self, *exc):
        t1 = perf_counter_ns()
        tr = self._tr
        loc = tr._local
        try:
            loc.depth -= 1
        except AttributeError:                      # entered on another thread
            tr._init_thread()
            loc.depth = 0
        if tr._recording:
            events = tr._events
            events.append(("X", self._name, self._t0, t1 - self._t0, loc.tid, self._args, "cpu"))
            if len(events) >= tr._max_buffered and (loc.depth <= 0 or len(events) >= 4 * tr._max_buffered):
                tr._auto_flush()
        return False


class _GpuSpan:
    __slots__ = ("_tr", "_name", "_stream", "_key", "_start")

    def __init__(self, tr: "Tracer", name: str, stream) -> None:
        self._tr = tr
        self._name = name
        self._stream = stream
        self._start = None

    def __enter__(self):
        tr = self._tr
        if not tr._recording:
            return self
        b = tr._gpu
        stream = self._stream if self._stream is not None else b.current_stream()
        if b.is_capturing():
            return self
        self._stream = stream
        self._key = key = b.stream_key(stream)
        tr._check_anchor(stream, key[0])
        ev = tr._new_event(key[0])
        ev.record(stream)
        self._start = ev
        return self

    def __exit__(self, *exc):
        start = self._start
        if start is None:
            return False
        tr = self._tr
        key = self._key
        end = tr._new_event(key[0])
        end.record(self._stream)
        tr._pending.append((self._name, key, start, end))
        if len(tr._pending) >= tr._resolve_every:
            tr._resolve(block=False)
            if len(tr._pending) >= 32 * tr._resolve_every:     # the GPU is far behind: bound the backlog
                tr._resolve(block=True)
        return False


class _TorchCuda:
    """The CUDA calls the tracer makes, in one place (tests substitute a fake)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def available(self) -> bool:
        return self.torch.cuda.is_available()

    def current_stream(self, device=None):
        return self.torch.cuda.current_stream(device)

    def is_capturing(self) -> bool:
        return self.torch.cuda.is_current_stream_capturing()

    def stream_key(self, stream) -> tuple[int, int]:
        return (stream.device_index, stream.stream_id)

    def new_event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def synchronize(self, device) -> None:
        self.torch.cuda.synchronize(device)


class Tracer:
    """Records CPU and GPU spans of this process; see the module docstring."""

    enabled = True

    def __init__(self, trace_dir: str, process_name: str, *, max_buffered_events: int = 10_000,
                 max_file_bytes: int = 2 << 30, resolve_every: int = 64, _gpu_backend=None) -> None:
        os.makedirs(trace_dir, exist_ok=True)
        self.process_name = process_name
        self.pid = os.getpid()
        self.path = os.path.join(trace_dir, trace_file_name(process_name, self.pid))
        self._max_buffered = max(1, int(max_buffered_events))
        self._max_file_bytes = int(max_file_bytes)
        self._resolve_every = max(1, int(resolve_every))
        self._events: list[tuple] = []
        self._thread_names: dict[int, str] = {}
        self._thread_names_written: set[int] = set()
        self._json_names: dict[str, str] = {}
        self._local = threading.local()
        self._lock = threading.RLock()
        self._recording = True
        self._closed = False
        self._trailer_pos: int | None = None      # file offset of the trailer; None = no file yet
        self._num_written = 0
        # GPU state (lazily set up on the first gpu_span).
        self._gpu = _gpu_backend                   # None = not probed yet; False = no CUDA
        self._pending: list[tuple] = []            # (name, (device, stream_id), start_ev, end_ev)
        self._ref: dict[int, tuple] = {}           # device -> (event, cpu time in ns)
        self._last_anchor_check: dict[int, int] = {}
        self._gpu_tids: dict[tuple[int, int], int] = {}
        self._event_pool: dict[int, list] = {}
        self.start_ns = perf_counter_ns()
        ref = weakref.ref(self)
        self._atexit = lambda: (t := ref()) is not None and t.close()
        atexit.register(self._atexit)

    # -- public API ------------------------------------------------------------------------------

    def cpu_span(self, name: str, /, **args) -> _CpuSpan:
        """Context manager: one complete ("X") event on this thread's track; args land in the event."""
        return _CpuSpan(self, name, args or None)

    def gpu_span(self, name: str, stream=None):
        """Context manager: CUDA events around the work queued on `stream` (default: the current
        stream) inside the block, shown on that stream's track. Never synchronises."""
        if self._gpu is None:
            self._probe_gpu()
        if self._gpu is False:
            return _NULL
        return _GpuSpan(self, name, stream)

    def complete(self, name: str, t0_ns: int, t1_ns: int, /, **args) -> None:
        """A CPU span timed by the caller (perf_counter_ns) on this thread's track."""
        if self._recording:
            tid = getattr(self._local, "tid", None) or self._init_thread()
            self._events.append(("X", name, t0_ns, t1_ns - t0_ns, tid, args or None, "cpu"))

    def instant(self, name: str, /, **args) -> None:
        if self._recording:
            tid = getattr(self._local, "tid", None) or self._init_thread()
            self._events.append(("i", name, perf_counter_ns(), 0, tid, args or None, "cpu"))

    def counter(self, name: str, value: float) -> None:
        """A counter ("C") track sample, e.g. running requests or KV-cache usage."""
        if self._recording:
            self._events.append(("C", name, perf_counter_ns(), 0, 0, {name: float(value)}, "counter"))

    def calibrate_gpu(self, device=None) -> None:
        """Anchor GPU time to the CPU clock now (synchronises `device` once). Optional: the first
        gpu_span on a device does this itself; call it at start-up to keep that wait out of a step."""
        if self._gpu is None:
            self._probe_gpu()
        if self._gpu is False:
            return
        with self._lock:
            stream = self._gpu.current_stream(device)
            self._calibrate(stream, wait=True)
            self._last_anchor_check[self._gpu.stream_key(stream)[0]] = perf_counter_ns()

    def flush(self) -> None:
        """Wait for the pending GPU spans and append everything buffered to the file."""
        self._flush(block=True)

    def close(self) -> None:
        """Flush and stop recording. Safe to call twice."""
        if self._closed:
            return
        try:
            self._flush(block=True)
        finally:
            self._closed = True
            self._recording = False
            atexit.unregister(self._atexit)

    def _init_thread(self) -> int:
        """Per-thread state: the track id (native thread id) and its name for the metadata."""
        tid = self._local.tid = threading.get_native_id()
        self._thread_names.setdefault(tid, threading.current_thread().name)
        return tid

    # -- GPU ---------------------------------------------------------------------------------------

    def _probe_gpu(self) -> None:
        try:
            if "torch" not in sys.modules:
                import torch  # noqa: F401
            backend = _TorchCuda()
            self._gpu = backend if backend.available() else False
        except Exception:                                   # no torch, broken driver: no GPU spans
            self._gpu = False

    def _new_event(self, device: int):
        pool = self._event_pool.get(device)
        return pool.pop() if pool else self._gpu.new_event()

    def _release(self, device: int, *events) -> None:
        """Finished (or abandoned) events go back to a per-device pool for reuse."""
        pool = self._event_pool.setdefault(device, [])
        if len(pool) < 4096:
            pool.extend(events)

    def _calibrate(self, stream, wait: bool) -> bool:
        """Time an event on `stream` with perf_counter on both sides; keep the tightest of three
        tries and take the midpoint as the event's CPU time. wait: synchronise the device first
        and wait for the events. Otherwise spin at most 200 us per event and, if the stream was
        busy, keep the old reference and return False."""
        b = self._gpu
        device = b.stream_key(stream)[0]
        have_ref = not wait
        if wait:
            b.synchronize(device)
        best = None
        for _ in range(3):
            ev = self._new_event(device)
            t0 = perf_counter_ns()
            ev.record(stream)
            if have_ref:
                # Re-anchoring on the hot path: spin briefly instead of waiting behind queued work.
                while not ev.query():
                    if perf_counter_ns() - t0 > 200_000:
                        self._release(device, ev)
                        if best is not None:
                            self._release(device, best[2])
                        return False
            else:
                ev.synchronize()
            t1 = perf_counter_ns()
            if best is None or t1 - t0 < best[1] - best[0]:
                if best is not None:
                    self._release(device, best[2])
                best = (t0, t1, ev)
            else:
                self._release(device, ev)
        t0, t1, ev = best
        old = self._ref.get(device)
        self._ref[device] = (ev, (t0 + t1) // 2)
        if old is not None:
            self._release(device, old[0])
        return True

    def _check_anchor(self, stream, device: int) -> None:
        now = perf_counter_ns()
        last = self._last_anchor_check.get(device)
        self._last_anchor_check[device] = now
        if last is not None and now - last < 1_000_000_000 and device in self._ref:
            return
        with self._lock:
            if device in self._ref:
                # >1 s since the last GPU span on this device: re-anchor, but only with nothing
                # pending on it (those would otherwise be timed across the idle stretch).
                self._resolve(block=False)
                if any(key[0] == device for _, key, _, _ in self._pending):
                    return
            self._calibrate(stream, wait=device not in self._ref)

    def _resolve(self, block: bool) -> None:
        """Turn completed GPU spans into trace events (all of them, waiting, if block)."""
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
            keep = []
            newest: dict[int, tuple] = {}
            for item in pending:
                name, key, start, end = item
                if block:
                    end.synchronize()
                elif not end.query():
                    keep.append(item)
                    continue
                device = key[0]
                ref_ev, ref_ns = self._ref[device]
                t0 = ref_ns + ref_ev.elapsed_time(start) * 1e6
                t1 = ref_ns + ref_ev.elapsed_time(end) * 1e6
                tid = self._gpu_tids.get(key)
                if tid is None:
                    tid = self._gpu_tids[key] = _GPU_TID_BASE + len(self._gpu_tids)
                    dev, sid = key
                    self._thread_names[tid] = f"GPU stream {sid}" if dev == 0 else f"GPU {dev} stream {sid}"
                self._events.append(("X", name, t0, max(0.0, t1 - t0), tid,
                                     {"device": device, "stream": key[1]}, "gpu"))
                if device not in newest or t1 > newest[device][1]:
                    if device in newest:
                        self._release(device, newest[device][0])
                    newest[device] = (end, t1, key)
                else:
                    self._release(device, end)
                self._release(device, start)
            # Re-base each device's reference onto its newest resolved event, so that elapsed_time
            # (float32 ms) is only ever taken over short stretches. Not while a span on another
            # stream of that device is unresolved: its start may precede the new reference.
            for device, (ev, t, key) in newest.items():
                if any(k[0] == device and k != key for _, k, _, _ in keep):
                    self._release(device, ev)
                    continue
                self._release(device, self._ref[device][0])
                self._ref[device] = (ev, t)
            self._pending = keep + self._pending

    # -- writing -----------------------------------------------------------------------------------

    def _auto_flush(self) -> None:
        if not self._lock.acquire(blocking=False):
            return
        try:
            t0 = perf_counter_ns()
            tid = getattr(self._local, "tid", None) or self._init_thread()
            self._flush(block=False, extra=("X", "trace_flush", t0, None, tid, None, "cpu"))
        finally:
            self._lock.release()

    def _flush(self, block: bool, extra: tuple | None = None) -> None:
        if self._closed or os.getpid() != self.pid:
            return
        with self._lock:
            if self._gpu:
                self._resolve(block=block)
            events, self._events = self._events, []
            if extra is not None:                           # the flush's own span, timed up to here
                events.append(extra[:3] + (perf_counter_ns() - extra[2],) + extra[4:])
            self._write(events)

    def _meta_events(self) -> list[dict]:
        out = []
        if self._trailer_pos is None:
            out.append({"ph": "M", "name": "process_name", "pid": self.pid, "tid": 0,
                        "args": {"name": self.process_name}})
        for tid, name in list(self._thread_names.items()):
            if tid in self._thread_names_written:
                continue
            self._thread_names_written.add(tid)
            out.append({"ph": "M", "name": "thread_name", "pid": self.pid, "tid": tid, "args": {"name": name}})
            if tid >= _GPU_TID_BASE:                        # GPU tracks above the CPU threads
                out.append({"ph": "M", "name": "thread_sort_index", "pid": self.pid, "tid": tid,
                            "args": {"sort_index": -1000 + tid - _GPU_TID_BASE}})
        return out

    def _encode(self, events: list[tuple]) -> list[str]:
        """One JSON object per event, formatted by hand (json.dumps per event costs several us)."""
        events.sort(key=lambda e: e[2])
        pid = self.pid
        names = self._json_names
        dumps = json.dumps
        lines = []
        for ph, name, ts, dur, tid, args, cat in events:
            jname = names.get(name)
            if jname is None:
                jname = names[name] = dumps(str(name))
            line = f'{{"ph": "{ph}", "name": {jname}, "cat": "{cat}", "ts": {ts / 1000:.3f}, "pid": {pid}, "tid": {tid}'
            if ph == "X":
                line += f', "dur": {dur / 1000:.3f}'
            elif ph == "i":
                line += ', "s": "t"'
            if args:
                try:
                    line += ', "args": ' + dumps(args)
                except (TypeError, ValueError):
                    line += ', "args": ' + dumps({str(k): repr(v) for k, v in args.items()})
            lines.append(line + "}")
        return lines

    def _write(self, events: list[tuple]) -> None:
        lines = [json.dumps(m) for m in self._meta_events()] + self._encode(events)
        if not lines and self._trailer_pos is not None:
            return
        body = ",\n".join(lines).encode()
        try:
            if self._trailer_pos is None:
                header = {"displayTimeUnit": "ms",
                          "otherData": {"producer": "braid", "process_name": self.process_name, "pid": self.pid,
                                        "clock": "time.perf_counter_ns()/1000 (CLOCK_MONOTONIC on Linux)",
                                        "start_us": round(self.start_ns / 1000, 3)}}
                head = json.dumps(header)[:-1].encode() + b', "traceEvents": [\n'
                with open(self.path, "wb") as f:
                    f.write(head + body)
                    self._trailer_pos = f.tell()
                    f.write(_TRAILER)
            else:
                with open(self.path, "r+b") as f:
                    f.seek(self._trailer_pos)
                    f.write((b",\n" if self._num_written else b"") + body)
                    self._trailer_pos = f.tell()
                    f.write(_TRAILER)
                    f.truncate()
        except OSError as e:
            logger.warning("trace: cannot write %s (%s); tracing stopped", self.path, e)
            self._recording = False
            return
        self._num_written += len(lines)
        if self._recording and self._trailer_pos >= self._max_file_bytes:
            logger.warning("trace: %s reached %d bytes; tracing stopped", self.path, self._max_file_bytes)
            self._recording = False
