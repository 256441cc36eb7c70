"""Host stalls as trace spans: slow garbage collections and Triton compiles (runtime_probes)."""
from __future__ import annotations

import gc
import json
from types import SimpleNamespace

import pytest

from braid.observe import runtime_probes
from braid.observe.trace import make_tracer


def _spans(tracer, name):
    tracer.close()
    with open(tracer.path) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e["ph"] == "X" and e["name"] == name]


def test_a_slow_collection_is_a_span(tmp_path):
    tracer = make_tracer(str(tmp_path), "worker-0")
    junk = [[i] for i in range(300_000)]  # enough tracked containers for a collection of >= 1 ms
    gc.collect()
    del junk
    spans = _spans(tracer, "gc")
    full = [s for s in spans if s["args"]["generation"] == 2]  # gc.collect(); younger ones may come first
    assert full and all(s["dur"] >= 1000 for s in spans)   # us: none under the 1 ms floor


def test_a_triton_compile_is_a_span_and_earlier_hooks_still_run(tmp_path, monkeypatch):
    knobs = pytest.importorskip("triton").knobs
    calls = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda *a, **k: calls.append("before") or False)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda *a, **k: calls.append("after"))
    monkeypatch.delitem(runtime_probes._installed, "triton", raising=False)
    tracer = make_tracer(str(tmp_path), "worker-0")
    # What Triton does around a compile: the cache hook (a true result would skip compiling), then the post hook.
    assert knobs.runtime.jit_cache_hook(key="k", repr="_kernel[...]", fn=SimpleNamespace(name="_kernel")) is False
    knobs.runtime.jit_post_compile_hook(key="k", repr="_kernel[...]", fn=SimpleNamespace(name="_kernel"))
    assert calls == ["before", "after"]
    spans = _spans(tracer, "triton_compile")
    assert [s["args"]["kernel"] for s in spans] == ["_kernel"]


def test_probes_record_nothing_after_the_tracer_closes(tmp_path):
    tracer = make_tracer(str(tmp_path), "worker-0")
    tracer.close()
    gc.collect()  # must not raise or write
    assert runtime_probes._tracer() is tracer


def test_a_compile_an_earlier_hook_skips_leaves_no_stale_start(tmp_path, monkeypatch):
    knobs = pytest.importorskip("triton").knobs
    skips = iter([True, False])
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda *a, **k: next(skips))
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    monkeypatch.delitem(runtime_probes._installed, "triton", raising=False)
    tracer = make_tracer(str(tmp_path), "worker-0")
    assert knobs.runtime.jit_cache_hook(key="a") is True   # skipped: no post hook follows
    assert knobs.runtime.jit_cache_hook(key="b") is False
    knobs.runtime.jit_post_compile_hook(key="b", fn=SimpleNamespace(name="_b"))
    knobs.runtime.jit_post_compile_hook(key="x", fn=SimpleNamespace(name="_x"))  # no start left: no span
    assert [s["args"]["kernel"] for s in _spans(tracer, "triton_compile")] == ["_b"]
