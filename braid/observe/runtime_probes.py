"""Trace spans for host stalls that no engine span names: Python garbage collections of
1 ms or more, and Triton compiling a kernel (a specialization first met mid-run — a new
value of a constexpr, or an int argument that newly is or is not divisible by 16).
Either can hold a step's launch for hundreds of milliseconds while every GPU waits.

Installed once per process with the first recording tracer (--trace-dir); the hooks hold
the tracer weakly and record nothing once it is closed.
"""
from __future__ import annotations

import gc
import weakref
from time import perf_counter_ns

_MIN_GC_NS = 1_000_000
_installed: dict[str, object] = {}


def install(tracer) -> None:
    """Point the process's probes at `tracer` (installing them on first use)."""
    ref = weakref.ref(tracer)
    _installed["tracer"] = ref
    if "gc" not in _installed:
        _installed["gc"] = _install_gc_probe()
    if "triton" not in _installed:
        _installed["triton"] = _install_triton_probe()


def _tracer():
    ref = _installed.get("tracer")
    return ref() if ref is not None else None


def _install_gc_probe() -> bool:
    started: list[int] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(perf_counter_ns())
        elif started:
            t0 = started.pop()
            t1 = perf_counter_ns()
            tracer = _tracer()
            if tracer is not None and t1 - t0 >= _MIN_GC_NS:
                tracer.complete("gc", t0, t1, generation=info.get("generation"), collected=info.get("collected"))

    gc.callbacks.append(on_gc)
    return True


def _install_triton_probe() -> bool:
    """Triton calls jit_cache_hook before compiling and jit_post_compile_hook after (Triton
    >= 3.4's knobs; older versions are left alone). Hooks already set are chained."""
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        return False
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    started: list[int] = []

    def on_compile_start(*args, **kwargs):
        skip = before(*args, **kwargs) if before is not None else False
        if not skip:  # a true result skips the compile, and then the post hook never comes
            started.append(perf_counter_ns())
        return skip

    def on_compile_end(*args, **kwargs):
        if started:
            t0 = started.pop()
            tracer = _tracer()
            if tracer is not None:
                fn = kwargs.get("fn")
                tracer.complete("triton_compile", t0, perf_counter_ns(),
                                kernel=getattr(fn, "name", None) or str(kwargs.get("repr", ""))[:120])
        return after(*args, **kwargs) if after is not None else None

    runtime.jit_cache_hook = on_compile_start
    runtime.jit_post_compile_hook = on_compile_end
    return True
