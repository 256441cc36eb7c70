"""Step timeline: tracer (CPU spans, GPU spans via CUDA events, file policy), summarizer and CLI."""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
import tracemalloc

import numpy as np
import pytest

from braid.observe import trace as trace_mod
from braid.observe.trace import NULL_TRACER, NullTracer, Tracer, make_tracer, trace_file_name
from braid.observe.trace_cli import add_trace_subparsers
from braid.observe.trace_summary import format_summary, load_trace_events, summarize

GPU_TID = 1_000_000_000


def _load(path):
    with open(path) as f:
        data = json.load(f)
    assert data["displayTimeUnit"] == "ms"
    return data["traceEvents"]


def _x(events, name=None, cat=None):
    return [e for e in events if e["ph"] == "X" and (name is None or e["name"] == name)
            and (cat is None or e.get("cat") == cat)]


# ---- NullTracer ------------------------------------------------------------------------------------


def test_null_tracer_is_free(monkeypatch):
    tracer = make_tracer(None, "engine-core")
    assert tracer is NULL_TRACER and isinstance(tracer, NullTracer) and not tracer.enabled

    def boom(*a, **k):
        raise AssertionError("NullTracer must not read the clock or touch CUDA")

    monkeypatch.setattr(trace_mod, "perf_counter_ns", boom)
    import torch
    monkeypatch.setattr(torch.cuda, "Event", boom)
    monkeypatch.setattr(torch.cuda, "synchronize", boom)

    a = tracer.cpu_span("step")
    assert tracer.cpu_span("x", k=1) is a and tracer.gpu_span("forward") is a
    with tracer.cpu_span("step"), tracer.gpu_span("forward"):
        pass
    tracer.instant("i", a=1)
    tracer.counter("c", 1.0)
    tracer.calibrate_gpu()
    tracer.flush()
    tracer.close()
    assert not hasattr(tracer, "__dict__")          # nowhere to keep anything

    t0 = time.perf_counter()
    for _ in range(100_000):
        with tracer.cpu_span("step"):
            with tracer.gpu_span("forward"):
                pass
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed                   # ~0.05 s normally; a very generous bound

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10_000):
            with tracer.cpu_span("step"):
                with tracer.gpu_span("forward"):
                    pass
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4096, grown                      # nothing kept


# ---- CPU spans and the file ------------------------------------------------------------------------


def test_cpu_spans_nest_and_serialise(tmp_path):
    tracer = make_tracer(str(tmp_path), "engine core/0")
    assert isinstance(tracer, Tracer)
    assert tracer.path == str(tmp_path / f"braid-trace-engine_core_0-{os.getpid()}.json")
    assert os.path.basename(tracer.path) == trace_file_name("engine core/0", os.getpid())
    for i in range(3):
        with tracer.cpu_span("step", step=i):
            with tracer.cpu_span("schedule"):
                time.sleep(0.001)
            with tracer.cpu_span("launch"):
                tracer.instant("marker", n=i)
        tracer.counter("num_running", i)
    tracer.flush()
    events = _load(tracer.path)
    for e in events:
        assert {"ph", "name", "pid", "tid"} <= set(e)
        assert e["pid"] == os.getpid()
    meta = [e for e in events if e["ph"] == "M"]
    assert {"name": "engine core/0"} in [e["args"] for e in meta if e["name"] == "process_name"]
    tid = threading.get_native_id()
    assert any(e["name"] == "thread_name" and e["tid"] == tid for e in meta)
    timed = [e for e in events if e["ph"] != "M"]
    ts = [e["ts"] for e in timed]
    assert ts == sorted(ts)                                      # monotonic within a flush
    steps, scheds, launches = _x(events, "step"), _x(events, "schedule"), _x(events, "launch")
    assert [s["args"]["step"] for s in steps] == [0, 1, 2]
    assert all(s["cat"] == "cpu" and s["tid"] == tid for s in steps)
    for step, sched, launch in zip(steps, scheds, launches):
        end = step["ts"] + step["dur"]
        assert step["ts"] <= sched["ts"] and sched["ts"] + sched["dur"] <= launch["ts"] + 1e-3
        assert launch["ts"] + launch["dur"] <= end + 1e-3
        assert sched["dur"] >= 1000                              # slept 1 ms, in us
    assert [e["args"]["n"] for e in events if e["ph"] == "i"] == [0, 1, 2]
    counters = [e for e in events if e["ph"] == "C"]
    assert [e["args"] for e in counters] == [{"num_running": i} for i in range(3)]
    # Timestamps are perf_counter microseconds.
    now_us = time.perf_counter_ns() / 1000
    assert now_us - 60e6 < steps[0]["ts"] < now_us
    tracer.close()


def test_flush_appends_and_close_stops(tmp_path):
    tracer = make_tracer(str(tmp_path), "frontend")
    tracer.flush()                                               # empty: still a valid file
    assert [e["name"] for e in _load(tracer.path)] == ["process_name"]
    with tracer.cpu_span("a"):
        pass
    tracer.flush()
    with tracer.cpu_span("b", weird=object()):                   # un-JSON-able args become repr
        pass
    tracer.close()
    events = _load(tracer.path)
    assert [e["name"] for e in _x(events)] == ["a", "b"]
    assert _x(events, "b")[0]["args"]["weird"].startswith("<object")
    with tracer.cpu_span("after-close"):
        pass
    tracer.counter("c", 1)
    tracer.close()
    tracer.flush()
    assert [e["name"] for e in _x(_load(tracer.path))] == ["a", "b"]
    assert len([e for e in _load(tracer.path) if e["name"] == "thread_name"]) == 1


def test_spans_from_another_thread_get_their_own_track(tmp_path):
    tracer = make_tracer(str(tmp_path), "frontend")

    def work():
        with tracer.cpu_span("detokenize"):
            pass

    t = threading.Thread(target=work, name="detok-thread")
    t.start()
    t.join()
    with tracer.cpu_span("main"):
        pass
    tracer.close()
    events = _load(tracer.path)
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    det = _x(events, "detokenize")[0]
    assert names[det["tid"]] == "detok-thread"
    assert det["tid"] != _x(events, "main")[0]["tid"]


def test_buffer_is_bounded_and_flushed_between_steps(tmp_path):
    tracer = make_tracer(str(tmp_path), "engine-core", max_buffered_events=100)
    peak = 0
    for i in range(1050):
        with tracer.cpu_span("step"):
            with tracer.cpu_span("schedule"):
                pass
        peak = max(peak, len(tracer._events))
    assert peak <= 101                                           # flushed when a step closes
    assert len(_x(_load(tracer.path), "step")) >= 1000           # already on disk before close
    # Inner spans never flush mid-step unless the buffer reaches 4x the limit.
    with tracer.cpu_span("step"):
        for _ in range(150):
            with tracer.cpu_span("inner"):
                pass
        assert len(tracer._events) >= 150
        for _ in range(300):
            with tracer.cpu_span("inner"):
                pass
        assert len(tracer._events) < 400
    tracer.close()
    events = _load(tracer.path)
    assert len(_x(events, "step")) == 1051 and len(_x(events, "schedule")) == 1050
    assert len(_x(events, "inner")) == 450
    flushes = _x(events, "trace_flush")
    assert len(flushes) >= 10 and all(f["dur"] >= 0 for f in flushes)


def test_file_size_cap_stops_recording(tmp_path, caplog):
    tracer = make_tracer(str(tmp_path), "engine-core", max_buffered_events=10, max_file_bytes=5000)
    for _ in range(500):
        with tracer.cpu_span("step"):
            pass
    assert not tracer._recording and len(tracer._events) == 0
    assert "tracing stopped" in caplog.text
    tracer.close()
    events = _load(tracer.path)
    assert 0 < len(_x(events, "step")) < 500
    assert os.path.getsize(tracer.path) < 5000 + 2000


def test_truncated_file_is_still_readable(tmp_path):
    tracer = make_tracer(str(tmp_path), "engine-core")
    for _ in range(20):
        with tracer.cpu_span("step"):
            pass
    tracer.close()
    raw = open(tracer.path, "rb").read()
    cut = tmp_path / "cut" / "braid-trace-cut-1.json"
    cut.parent.mkdir()
    cut.write_bytes(raw[: len(raw) - 30])                        # lose the trailer and part of a line
    events = load_trace_events(str(cut))
    assert 17 <= len(_x(events, "step")) <= 19
    assert summarize(str(cut.parent))["steps"]["count"] == len(_x(events, "step"))


def test_gpu_span_is_a_noop_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    tracer = make_tracer(str(tmp_path), "engine-core")
    span = tracer.gpu_span("forward")
    assert span is tracer.gpu_span("sample")                     # the shared null context
    with tracer.gpu_span("forward"):
        pass
    tracer.calibrate_gpu()
    tracer.close()
    assert _x(_load(tracer.path), cat="gpu") == []


# ---- GPU spans against a fake CUDA ------------------------------------------------------------------


class _FakeEvent:
    """A timing event on a fake GPU whose clock is perf_counter_ns + offset; completes when the
    test says so (or on synchronize). elapsed_time is float32 ms, like CUDA's."""

    def __init__(self, cuda):
        self.cuda, self.t, self.done, self.records = cuda, None, False, 0

    def record(self, stream):
        self.t = time.perf_counter_ns() + self.cuda.offset_ns
        self.done = self.cuda.complete_immediately
        self.records += 1
        self.cuda.recorded.append(self)

    def query(self):
        return self.done

    def synchronize(self):                     # the stream is in order: everything before is done too
        self.cuda.syncs += 1
        rec = self.cuda.recorded
        last = len(rec) - 1 - rec[::-1].index(self)
        for e in rec[:last + 1]:
            e.done = True

    def elapsed_time(self, other):
        assert self.done and other.done, "elapsed_time on an unfinished event"
        return float(np.float32((other.t - self.t) / 1e6))


class _FakeStream:
    def __init__(self, device, sid):
        self.device_index, self.stream_id = device, sid


class _FakeCuda:
    def __init__(self):
        self.offset_ns = 123_456_789_000          # the GPU clock has its own epoch
        self.complete_immediately = True
        self.capturing = False
        self.created = 0
        self.syncs = 0
        self.device_syncs = 0
        self.recorded = []
        self.stream = _FakeStream(0, 0)

    def available(self):
        return True

    def current_stream(self, device=None):
        return self.stream

    def is_capturing(self):
        return self.capturing

    def stream_key(self, stream):
        return (stream.device_index, stream.stream_id)

    def new_event(self):
        self.created += 1
        return _FakeEvent(self)

    def synchronize(self, device):
        self.device_syncs += 1
        for e in self.recorded:
            e.done = True


def test_gpu_spans_map_onto_the_cpu_clock_without_waiting(tmp_path):
    cuda = _FakeCuda()
    tracer = Tracer(str(tmp_path), "engine-core", resolve_every=4, _gpu_backend=cuda)
    side = _FakeStream(0, 7)
    cuda.complete_immediately = False                              # the GPU lags: nothing finished yet
    for i in range(10):
        with tracer.cpu_span("step"):
            with tracer.gpu_span("forward"):
                time.sleep(0.0005)
            with tracer.gpu_span("sample", stream=side):
                pass
    assert cuda.device_syncs == 1                                  # only the first calibration waited
    syncs_before_flush = cuda.syncs
    assert len(tracer._pending) == 20 and not _x([{"ph": e[0], "name": e[1]} for e in tracer._events], "forward")
    # Some finish: a non-blocking resolve picks up exactly those.
    for item in tracer._pending[:6]:
        item[2].done = item[3].done = True
    ref = tracer._ref[0]
    tracer._resolve(block=False)
    assert len(tracer._pending) == 14 and cuda.syncs == syncs_before_flush
    assert tracer._ref[0] is ref            # stream 0 still has unresolved spans: no re-base past them
    cuda.capturing = True
    with tracer.gpu_span("captured"):                              # inside CUDA graph capture: skipped
        pass
    cuda.capturing = False
    tracer.close()
    events = _load(tracer.path)
    steps = _x(events, "step")
    fwd, smp = _x(events, "forward", "gpu"), _x(events, "sample", "gpu")
    assert len(fwd) == len(smp) == 10 and not _x(events, "captured")
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names[fwd[0]["tid"]] == "GPU stream 0" and names[smp[0]["tid"]] == "GPU stream 7"
    assert fwd[0]["tid"] >= GPU_TID and fwd[0]["args"] == {"device": 0, "stream": 0}
    for step, f, s in zip(steps, fwd, smp):
        # Fake GPU time == CPU time at record: spans land inside their step (calibration error < 50 us).
        assert step["ts"] - 0.05 <= f["ts"] and f["ts"] + f["dur"] <= s["ts"] + 0.05
        assert s["ts"] + s["dur"] <= step["ts"] + step["dur"] + 0.05
        assert f["dur"] >= 500
    assert cuda.created < 60                                       # events are pooled and reused


def test_gpu_reference_rebases_and_reanchors_after_idle(tmp_path, monkeypatch):
    cuda = _FakeCuda()
    tracer = Tracer(str(tmp_path), "engine-core", resolve_every=2, _gpu_backend=cuda)
    with tracer.gpu_span("forward"):
        pass
    ref0 = tracer._ref[0]
    with tracer.gpu_span("forward"):
        pass
    assert tracer._ref[0] is not ref0                              # re-based onto the newest resolved event
    # More than a second later: the tracer re-anchors (GPU idle, so the short spin succeeds).
    real = trace_mod.perf_counter_ns
    monkeypatch.setattr(trace_mod, "perf_counter_ns", lambda: real() + 5_000_000_000)
    ref1 = tracer._ref[0]
    cuda.offset_ns += 1_000_000                                    # the GPU clock drifted by 1 ms
    with tracer.gpu_span("later"):
        pass
    assert tracer._ref[0] is not ref1
    monkeypatch.setattr(trace_mod, "perf_counter_ns", real)
    with tracer.cpu_span("cpu"):
        pass
    tracer.close()
    events = _load(tracer.path)
    later = _x(events, "later")[0]
    cpu = _x(events, "cpu")[0]
    # Mapped with the new anchor: ~5 s after now, drift absorbed (within 50 us).
    assert abs(later["ts"] - (cpu["ts"] + 5e6)) < 5e4
    assert cuda.device_syncs == 1


def test_gpu_backlog_is_bounded_and_devices_get_their_own_tracks(tmp_path):
    cuda = _FakeCuda()
    cuda.stream = _FakeStream(1, 3)
    tracer = Tracer(str(tmp_path), "worker-rank1", resolve_every=2, _gpu_backend=cuda)
    tracer.calibrate_gpu()
    cuda.complete_immediately = False
    for _ in range(200):
        with tracer.gpu_span("forward"):
            pass
        assert len(tracer._pending) < 64
    tracer.close()
    events = _load(tracer.path)
    fwd = _x(events, "forward", "gpu")
    assert len(fwd) == 200 and fwd[0]["args"] == {"device": 1, "stream": 3}
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names[fwd[0]["tid"]] == "GPU 1 stream 3"
    assert all(a["ts"] + a["dur"] <= b["ts"] + 0.05 for a, b in zip(fwd, fwd[1:]))
    assert cuda.device_syncs == 1


# ---- summarizer --------------------------------------------------------------------------------------


def _synthetic(tmp_path):
    def meta(pid, name, threads):
        out = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}]
        out += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": t, "args": {"name": n}} for t, n in threads]
        return out

    def x(pid, tid, name, ts, dur, cat="cpu", **args):
        ev = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": pid, "tid": tid}
        if args:
            ev["args"] = args
        return ev

    core = meta(100, "engine-core", [(1, "MainThread"), (GPU_TID, "GPU stream 0"), (GPU_TID + 1, "GPU stream 7")])
    core += [x(100, 1, "step", ts, dur) for ts, dur in [(0, 1000), (1000, 2000), (3000, 1000), (4000, 4000)]]
    core += [x(100, 1, "schedule", 0, 200), x(100, 1, "schedule", 1000, 400), x(100, 1, "process_outputs", 3000, 500)]
    core += [x(100, GPU_TID, n, ts, dur, "gpu", device=0, stream=0)
             for n, ts, dur in [("forward", 100, 800), ("forward", 1500, 1400), ("sample", 2800, 300),
                                ("forward", 5000, 2000)]]
    core += [x(100, GPU_TID + 1, "forward", 200, 200, "gpu", device=0, stream=7)]
    core += [{"ph": "C", "name": "num_running", "ts": t, "pid": 100, "tid": 0, "args": {"num_running": v}}
             for t, v in [(0, 2), (4000, 6)]]
    front = meta(200, "frontend", [(9, "MainThread")]) + [x(200, 9, "detokenize", 3200, 100)]
    d = tmp_path / "traces"
    d.mkdir(parents=True)
    (d / "braid-trace-engine-core-100.json").write_text(json.dumps({"traceEvents": core, "displayTimeUnit": "ms"}))
    (d / "braid-trace-frontend-200.json").write_text(json.dumps({"traceEvents": front}))
    return d


def test_summary_of_synthetic_traces(tmp_path):
    s = summarize(str(_synthetic(tmp_path)), top=5)
    assert len(s["files"]) == 2 and s["processes"] == {"100": "engine-core", "200": "frontend"}
    gpu = s["gpu"]
    assert gpu["num_spans"] == 5 and gpu["start_us"] == 100 and gpu["end_us"] == 7000
    assert gpu["window_ms"] == pytest.approx(6.9)
    assert gpu["busy_fraction"] == pytest.approx(4400 / 6900)      # union [100,900] [1500,3100] [5000,7000]
    per_stream = {p["track"]: p for p in gpu["per_stream"]}
    assert per_stream["engine-core[100] GPU stream 0"]["busy_fraction"] == pytest.approx(4400 / 6900)
    assert per_stream["engine-core[100] GPU stream 7"]["busy_fraction"] == pytest.approx(200 / 6900)
    assert [g["gpu"] for g in gpu["per_gpu"]] == ["engine-core[100] cuda:0"]
    assert gpu["span_names"]["forward"]["count"] == 4 and gpu["span_names"]["sample"]["mean_ms"] == pytest.approx(0.3)

    st = s["steps"]
    assert st["count"] == 4
    assert st["mean_ms"] == pytest.approx(2.0) and st["median_ms"] == pytest.approx(1.5)
    assert st["p90_ms"] == pytest.approx(3.4) and st["steps_per_s"] == pytest.approx(500.0)
    cpu = {(c["process"], c["name"]): c for c in s["cpu_spans"]}
    sched = cpu[("engine-core[100]", "schedule")]
    assert (sched["count"], sched["mean_ms"], sched["total_ms"], sched["per_step_ms"]) == \
        (2, pytest.approx(0.3), pytest.approx(0.6), pytest.approx(0.15))
    assert cpu[("frontend[200]", "detokenize")]["count"] == 1
    assert not any(c["name"] in ("forward", "sample") for c in s["cpu_spans"])

    gaps = s["gaps"]
    assert [(g["at_ms"], g["length_ms"]) for g in gaps] == [(pytest.approx(3.0), pytest.approx(1.9)),
                                                            (pytest.approx(0.8), pytest.approx(0.6))]
    assert gaps[0]["start_us"] == 3100
    ov = [(o["process"], o["name"], o["overlap_ms"], o["count"]) for o in gaps[0]["overlapping"]]
    assert ov == [("engine-core[100]", "step", pytest.approx(1.9), 2),
                  ("engine-core[100]", "process_outputs", pytest.approx(0.4), 1),
                  ("frontend[200]", "detokenize", pytest.approx(0.1), 1)]
    assert [(o["name"], o["overlap_ms"]) for o in gaps[1]["overlapping"]] == [("step", pytest.approx(0.6)),
                                                                         ("schedule", pytest.approx(0.4))]
    assert s["counters"]["num_running"] == {"samples": 2, "mean": 4.0, "max": 6.0, "last": 6.0}
    assert len(summarize(str(_synthetic(tmp_path / "b")), top=1)["gaps"]) == 1

    text = format_summary(s)
    assert "busy 63.8%" in text and "500.00 steps/s" in text
    assert "Largest GPU idle gaps (2)" in text and "step 1.900" in text


def test_summary_warns_about_separate_runs_and_empty_files(tmp_path):
    d = _synthetic(tmp_path)
    assert summarize(str(d))["warnings"] == []
    # A second engine core, a minute after the first run: another run in the same directory.
    later = [{"ph": "M", "name": "process_name", "pid": 300, "tid": 0, "args": {"name": "engine-core"}}]
    later += [{"ph": "X", "name": "step", "cat": "cpu", "ts": 60e6 + i * 1000, "dur": 500, "pid": 300, "tid": 1}
              for i in range(3)]
    later += [{"ph": "X", "name": "schedule", "cat": "cpu", "ts": 60e6, "dur": 300, "pid": 300, "tid": 1}]
    (d / "braid-trace-engine-core-300.json").write_text(json.dumps({"traceEvents": later}))
    (d / "braid-trace-engine-core-400.json").write_text("")
    s = summarize(str(d))
    assert any("2 runs" in w for w in s["warnings"]) and any("no timed events" in w for w in s["warnings"])
    cpu = {(c["process"], c["name"]): c for c in s["cpu_spans"]}
    assert cpu[("engine-core[300]", "schedule")]["per_step_ms"] == pytest.approx(0.1)  # its own 3 steps
    assert cpu[("engine-core[100]", "schedule")]["per_step_ms"] == pytest.approx(0.15)  # its own 4
    assert "WARNING: the files come from 2 runs" in format_summary(s)


def test_summary_accepts_files_and_several_gpus(tmp_path):
    d = _synthetic(tmp_path)
    rank1 = [{"ph": "M", "name": "process_name", "pid": 300, "tid": 0, "args": {"name": "worker-rank1"}},
             {"ph": "X", "name": "forward", "cat": "gpu", "ts": 100, "dur": 6900, "pid": 300, "tid": GPU_TID,
              "args": {"device": 1, "stream": 0}}]
    (d / "braid-trace-worker-rank1-300.json").write_text(json.dumps(rank1))   # bare-array form
    s = summarize([str(p) for p in sorted(d.iterdir())])
    assert len(s["gpu"]["per_gpu"]) == 2
    assert s["gpu"]["busy_fraction"] == pytest.approx((4400 / 6900 + 1.0) / 2)
    assert all(g["gpu"] == "engine-core[100] cuda:0" for g in s["gaps"])
    with pytest.raises(FileNotFoundError):
        summarize(str(tmp_path / "missing"))


def test_summary_reports_dual_batch_overlap_efficiency(tmp_path):
    """Two micro-batches' segments on a compute and a comm stream: compute [0,10)+[10,20) us,
    comm [5,12) us: T_compute 20, T_comm 7, together 20 -> (27 - 20) / 7 = 100%; on a second
    GPU comm [20,30) after compute [0,20): nothing hidden -> 0%."""
    def seg(name, ts, dur, device, stream):
        return {"ph": "X", "name": name, "cat": "gpu", "ts": ts, "dur": dur, "pid": 1, "tid": GPU_TID + stream,
                "args": {"device": device, "stream": stream}}

    events = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "worker-0"}},
              seg("ubatch0 compute", 0, 10, 0, 0), seg("ubatch1 compute", 10, 10, 0, 0),
              seg("ubatch0 comm", 5, 7, 0, 1),
              seg("ubatch0 compute", 0, 20, 1, 0), seg("ubatch1 comm", 20, 10, 1, 1)]
    (tmp_path / "braid-trace-worker-0-1.json").write_text(json.dumps({"traceEvents": events}))
    s = summarize(str(tmp_path))
    dbo = s["gpu"]["dbo_overlap"]
    assert [g["efficiency"] for g in dbo["per_gpu"]] == [pytest.approx(1.0), pytest.approx(0.0)]
    assert dbo["efficiency"] == pytest.approx(7 / 17)  # (47 - 40) / min(40, 17)
    assert "overlap efficiency 41.2%" in format_summary(s)
    assert summarize(str(_synthetic(tmp_path / "plain")))["gpu"]["dbo_overlap"] is None


def test_summary_of_a_real_cpu_trace(tmp_path):
    tracer = make_tracer(str(tmp_path), "engine-core")
    for _ in range(5):
        with tracer.cpu_span("step"):
            with tracer.cpu_span("schedule"):
                time.sleep(0.001)
    tracer.close()
    s = summarize(str(tmp_path))
    assert s["steps"]["count"] == 5 and s["steps"]["mean_ms"] >= 1.0
    assert s["gpu"]["busy_fraction"] is None and s["gaps"] == []
    assert "no GPU spans" in format_summary(s)


# ---- CLI ---------------------------------------------------------------------------------------------


def _cli(argv):
    parser = argparse.ArgumentParser(prog="braid")
    add_trace_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    d = _synthetic(tmp_path)
    out_json = tmp_path / "summary.json"
    assert _cli(["trace", "summarize", str(d), "--top", "1", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "GPU: busy 63.8%" in text and "engine-core[100] schedule" in text
    assert "Largest GPU idle gaps (1)" in text
    data = json.loads(out_json.read_text())
    assert data["steps"]["count"] == 4 and len(data["gaps"]) == 1
    assert data["gpu"]["busy_fraction"] == pytest.approx(4400 / 6900)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(["trace", "summarize", str(empty)]) == 1
    assert _cli(["trace", "summarize", str(tmp_path / "nope")]) == 1
    assert "no trace files" in capsys.readouterr().err


def test_cli_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, argparse; from braid.observe.trace_cli import add_trace_subparsers; "
            "add_trace_subparsers(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('torch', 'numpy', 'braid.observe.trace_summary') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "[]"


# ---- real GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_spans_around_real_kernels(tmp_path):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tracer = make_tracer(str(tmp_path), "engine-core", resolve_every=4)
    tracer.calibrate_gpu()
    a = torch.randn(2048, 2048, device="cuda")
    # gpu_span never waits: with ~100 ms of GPU work queued, entering and leaving stays fast.
    torch.cuda._sleep(200_000_000)
    t0 = time.perf_counter()
    with tracer.gpu_span("forward"):
        pass
    assert time.perf_counter() - t0 < 0.05
    torch.cuda.synchronize()
    for _ in range(5):
        with tracer.cpu_span("step"):
            with tracer.cpu_span("launch"), tracer.gpu_span("forward"):
                for _ in range(20):
                    a = torch.tanh(a @ a)
            with tracer.gpu_span("sample"):
                torch.softmax(a, dim=-1).argmax(-1)
            torch.cuda.synchronize()
    tracer.close()
    events = _load(tracer.path)
    steps = _x(events, "step")
    gpu = [e for e in _x(events, cat="gpu")]
    assert len(gpu) == 11
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names[gpu[0]["tid"]].startswith("GPU stream")
    window = (steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"])
    for e in gpu[1:]:                                              # the first is the no-wait probe
        assert window[0] - 500 <= e["ts"] and e["ts"] + e["dur"] <= window[1] + 500, (e, window)
        assert any(s["ts"] - 500 <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 500 for s in steps)
    fwd = _x(events, "forward", "gpu")[1:]
    assert all(f["dur"] > 0 for f in fwd)
    s = summarize(str(tmp_path))
    assert 0 < s["gpu"]["busy_fraction"] <= 1
    assert s["steps"]["count"] == 5
