"""Summarize braid step-timeline traces (see braid.observe.trace): where did the GPU wait?

``summarize(paths)`` reads one or more trace files (a directory means every
``braid-trace-*.json`` in it; one file per process: frontend, engine core, worker ranks)
and returns a plain dict; ``format_summary(summary)`` renders it as text.

Definitions (all times in ms unless a key says _us; ``*_us`` are trace timestamps, i.e.
perf_counter microseconds, and ``at_ms`` is relative to the GPU window start):

- GPU window: first GPU span start to last GPU span end, over every file.
- busy fraction of a stream: (union of its spans) / window. Of a GPU (one device of one
  process): union over its streams / window. ``gpu.busy_fraction`` (overall): the mean over
  GPUs — for a single GPU just the union of all its spans over the window.
- steps: CPU spans named "step" (all processes): count, mean/median/p90 duration (p90 by
  linear interpolation), steps_per_s = count / (last step end - first step start).
- cpu_spans: per (process, span name): count, total, mean per span, and per_step_ms =
  total / number of steps (each step's CPU breakdown).
- gaps: stretches where a GPU ran none of the traced spans between its first and last
  span, largest first, each with the CPU spans (any process) that overlapped it, summed
  per (process, name) as overlap_ms.

GPU spans are recognised by ``cat == "gpu"`` (or a track named "GPU ..."); everything else
with ``ph == "X"`` is a CPU span. Files cut off mid-write are read line by line.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
from collections import defaultdict

__all__ = ["summarize", "format_summary", "load_trace_events", "trace_files"]


def trace_files(paths) -> list[str]:
    """Expand directories into their braid-trace-*.json files (sorted); keep file paths as given."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "braid-trace-*.json")))
            if not found:                                      # any Chrome trace in the folder
                found = sorted(glob.glob(os.path.join(p, "*.json")))
            files.extend(found)
        elif os.path.exists(p):
            files.append(p)
        else:
            raise FileNotFoundError(p)
    return files


def load_trace_events(path: str) -> list[dict]:
    """The traceEvents of one Chrome trace file (object or bare-array form); a file whose tail
    was cut mid-write (one event per line, as braid writes them) yields its complete lines."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
        return data["traceEvents"] if isinstance(data, dict) else list(data)
    except (ValueError, KeyError):
        pass
    events = []
    for line in raw.decode(errors="replace").splitlines():
        line = line.strip().rstrip(",")
        if line.startswith("{") and line.endswith("}"):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and "ph" in ev:
                events.append(ev)
    return events


def _union(intervals: list[tuple[float, float]]) -> list[list[float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            if e > merged[-1][1]:
                merged[-1][1] = e
        else:
            merged.append([s, e])
    return merged


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    k = (len(sorted_vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _ms(us: float) -> float:
    return us / 1000.0


def summarize(trace_dir_or_files, top: int = 10) -> dict:
    files = trace_files(trace_dir_or_files)
    proc_names: dict[int, str] = {}
    thread_names: dict[tuple[int, int], str] = {}
    spans: list[tuple[int, int, str, float, float, dict, str]] = []   # pid, tid, name, ts, dur, args, cat
    counters: dict[str, list[float]] = defaultdict(list)
    file_ranges: list[tuple[float, float]] = []
    empty: list[str] = []
    for path in files:
        events = load_trace_events(path)
        stamps = [(float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0.0))) for ev in events
                  if isinstance(ev.get("ts"), (int, float)) and isinstance(ev.get("dur", 0.0), (int, float))]
        if stamps:
            file_ranges.append((min(s for s, _ in stamps), max(e for _, e in stamps)))
        else:
            empty.append(path)
        for ev in events:
            ph = ev.get("ph")
            pid = ev.get("pid", 0)
            if ph == "M":
                name = (ev.get("args") or {}).get("name")
                if ev.get("name") == "process_name" and name is not None:
                    proc_names[pid] = str(name)
                elif ev.get("name") == "thread_name" and name is not None:
                    thread_names[(pid, ev.get("tid", 0))] = str(name)
            elif ph == "X":
                try:
                    spans.append((pid, ev.get("tid", 0), str(ev.get("name", "")), float(ev["ts"]),
                                  float(ev.get("dur", 0.0)), ev.get("args") or {}, ev.get("cat", "")))
                except (KeyError, TypeError, ValueError):
                    continue
            elif ph == "C":
                for k, v in (ev.get("args") or {}).items():
                    if isinstance(v, (int, float)):
                        counters[k if k == ev.get("name") else f"{ev.get('name')}.{k}"].append(float(v))

    def proc(pid: int) -> str:
        return f"{proc_names.get(pid, 'pid')}[{pid}]"

    gpu_spans, cpu_spans = [], []
    for sp in spans:
        is_gpu = sp[6] == "gpu" or thread_names.get((sp[0], sp[1]), "").startswith("GPU")
        (gpu_spans if is_gpu else cpu_spans).append(sp)

    summary: dict = {"files": files, "processes": {str(pid): name for pid, name in sorted(proc_names.items())},
                     "warnings": []}
    if empty:
        summary["warnings"].append(f"{len(empty)} file(s) with no timed events: {', '.join(empty[:3])}")
    runs = _separate_runs(file_ranges)
    if runs > 1:
        summary["warnings"].append(f"the files come from {runs} runs that do not overlap in time; rates and "
                                   f"fractions below span all of them (summarize one run's files)")

    # ---- GPU busy fraction --------------------------------------------------------------------
    gpu: dict = {"num_spans": len(gpu_spans), "window_ms": 0.0, "start_us": None, "end_us": None,
                 "busy_fraction": None, "per_gpu": [], "per_stream": [], "span_names": {}, "dbo_overlap": None}
    gpu_busy: dict[str, list[list[float]]] = {}
    if gpu_spans:
        w0 = min(s[3] for s in gpu_spans)
        w1 = max(s[3] + s[4] for s in gpu_spans)
        window = w1 - w0
        gpu.update(start_us=w0, end_us=w1, window_ms=_ms(window))
        by_stream: dict[tuple, list] = defaultdict(list)
        by_gpu: dict[str, list] = defaultdict(list)
        by_name: dict[str, list[float]] = defaultdict(list)
        for pid, tid, name, ts, dur, args, _ in gpu_spans:
            track = thread_names.get((pid, tid), f"GPU track {tid}")
            dev = args.get("device", 0) if isinstance(args, dict) else 0
            gpu_key = f"{proc(pid)} cuda:{dev}"
            by_stream[(gpu_key, f"{proc(pid)} {track}")].append((ts, ts + dur))
            by_gpu[gpu_key].append((ts, ts + dur))
            by_name[name].append(dur)

        def frac(busy_us: float) -> float:
            return busy_us / window if window > 0 else 1.0

        for (gpu_key, track), iv in sorted(by_stream.items()):
            busy = sum(e - s for s, e in _union(iv))
            gpu["per_stream"].append({"track": track, "gpu": gpu_key, "spans": len(iv), "busy_ms": _ms(busy),
                                      "busy_fraction": frac(busy)})
        fracs = []
        # Steady state: the middle 80% of the window (no start-up ramp, no drain at the end).
        s0, s1 = w0 + 0.1 * window, w1 - 0.1 * window
        for gpu_key, iv in sorted(by_gpu.items()):
            merged = gpu_busy[gpu_key] = _union(iv)
            busy = sum(e - s for s, e in merged)
            steady = sum(max(0.0, min(e, s1) - max(s, s0)) for s, e in merged)
            fracs.append(frac(busy))
            gpu["per_gpu"].append({"gpu": gpu_key, "spans": len(iv), "busy_ms": _ms(busy),
                                   "busy_fraction": fracs[-1],
                                   "steady_busy_fraction": steady / (s1 - s0) if s1 > s0 else 1.0})
        gpu["busy_fraction"] = sum(fracs) / len(fracs)
        gpu["dbo_overlap"] = dbo_overlap(gpu_spans, lambda pid, args: f"{proc(pid)} cuda:{args.get('device', 0)}")
        gpu["span_names"] = {n: {"count": len(d), "total_ms": _ms(sum(d)), "mean_ms": _ms(sum(d) / len(d))}
                             for n, d in sorted(by_name.items())}
    summary["gpu"] = gpu

    # ---- steps and CPU spans -----------------------------------------------------------------
    steps = [sp for sp in cpu_spans if sp[2] == "step"]
    st: dict = {"count": len(steps), "mean_ms": None, "median_ms": None, "p90_ms": None, "steps_per_s": None}
    if steps:
        durs = sorted(sp[4] for sp in steps)
        first = min(sp[3] for sp in steps)
        last = max(sp[3] + sp[4] for sp in steps)
        st.update(mean_ms=_ms(sum(durs) / len(durs)), median_ms=_ms(_percentile(durs, 0.5)),
                  p90_ms=_ms(_percentile(durs, 0.9)), min_ms=_ms(durs[0]), max_ms=_ms(durs[-1]),
                  steps_per_s=len(steps) / ((last - first) / 1e6) if last > first else None)
    summary["steps"] = st
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for pid, _, name, _, dur, _, _ in cpu_spans:
        groups[(proc(pid), name)].append(dur)
    own_steps: dict[str, int] = defaultdict(int)  # a process's own steps (an engine core); else all steps
    for sp in steps:
        own_steps[proc(sp[0])] += 1
    summary["cpu_spans"] = [
        {"process": p, "name": n, "count": len(d), "total_ms": _ms(sum(d)), "mean_ms": _ms(sum(d) / len(d)),
         "per_step_ms": _ms(sum(d) / (own_steps.get(p) or len(steps))) if steps else None}
        for (p, n), d in sorted(groups.items(), key=lambda kv: (kv[0][0], -sum(kv[1])))]

    # ---- GPU idle gaps -----------------------------------------------------------------------
    gaps = []
    for gpu_key, merged in gpu_busy.items():
        for (_, e0), (s1, _) in zip(merged, merged[1:]):
            if s1 > e0:
                gaps.append((s1 - e0, e0, gpu_key))
    gaps.sort(key=lambda g: (-g[0], g[1]))
    gaps = gaps[:max(0, top)]
    summary["gaps"] = []
    if gaps:
        cpu_sorted = sorted(cpu_spans, key=lambda sp: sp[3])
        starts = [sp[3] for sp in cpu_sorted]
        max_dur = max((sp[4] for sp in cpu_sorted), default=0.0)
        for length, start, gpu_key in gaps:
            end = start + length
            overlap: dict[tuple[str, str], list[float]] = {}
            # Spans starting before start - max_dur end before the gap: skip them.
            for pid, _, name, ts, dur, _, _ in cpu_sorted[bisect.bisect_left(starts, start - max_dur):]:
                if ts >= end:
                    break
                o = min(end, ts + dur) - max(start, ts)
                if o > 0:
                    acc = overlap.setdefault((proc(pid), name), [0.0, 0])
                    acc[0] += o
                    acc[1] += 1
            summary["gaps"].append({
                "gpu": gpu_key, "start_us": start, "at_ms": _ms(start - gpu["start_us"]), "length_ms": _ms(length),
                "overlapping": [{"process": p, "name": n, "overlap_ms": _ms(o), "count": c}
                                for (p, n), (o, c) in sorted(overlap.items(), key=lambda kv: (-kv[1][0], kv[0]))],
            })
    summary["counters"] = {k: {"samples": len(v), "mean": sum(v) / len(v), "max": max(v), "last": v[-1]}
                           for k, v in sorted(counters.items())}
    return summary


def _separate_runs(ranges: list[tuple[float, float]]) -> int:
    """How many groups of files whose time ranges chain together by overlapping."""
    runs, end = 0, None
    for start, stop in sorted(ranges):
        if end is None or start > end:
            runs += 1
            end = stop
        else:
            end = max(end, stop)
    return runs


def dbo_overlap(gpu_spans, gpu_of) -> dict | None:
    """Dual-batch overlap's efficiency from the micro-batches' segment spans ("ubatch0 comm",
    "ubatch1 compute", ...; worker/ubatching.py): per GPU, T_compute and T_comm (each a union
    of its segments), T_on = their union, and efficiency = (T_off - T_on) / min(T_comm,
    T_compute) with T_off = T_compute + T_comm, the same GPU work run one part after the
    other, as without DBO. None when the trace has no such spans."""
    parts: dict[str, dict[str, list]] = defaultdict(lambda: {"compute": [], "comm": []})
    for pid, _, name, ts, dur, args, _ in gpu_spans:
        kind = name.rsplit(" ", 1)[-1]
        if name.startswith("ubatch") and kind in ("compute", "comm"):
            parts[gpu_of(pid, args if isinstance(args, dict) else {})][kind].append((ts, ts + dur))
    if not parts:
        return None
    per_gpu, total = [], {"compute": 0.0, "comm": 0.0, "on": 0.0}
    for gpu_key, iv in sorted(parts.items()):
        t = {k: sum(e - s for s, e in _union(v)) for k, v in iv.items()}
        t["on"] = sum(e - s for s, e in _union(iv["compute"] + iv["comm"]))
        smaller = min(t["compute"], t["comm"])
        per_gpu.append({"gpu": gpu_key, "compute_ms": _ms(t["compute"]), "comm_ms": _ms(t["comm"]),
                        "on_ms": _ms(t["on"]), "serial_ms": _ms(t["compute"] + t["comm"]),
                        "efficiency": (t["compute"] + t["comm"] - t["on"]) / smaller if smaller > 0 else None})
        for k in total:
            total[k] += t[k]
    smaller = min(total["compute"], total["comm"])
    return {"per_gpu": per_gpu, "compute_ms": _ms(total["compute"]), "comm_ms": _ms(total["comm"]),
            "on_ms": _ms(total["on"]),
            "efficiency": (total["compute"] + total["comm"] - total["on"]) / smaller if smaller > 0 else None}


def _f(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_summary(summary: dict, top: int | None = None) -> str:
    out: list[str] = []
    procs = ", ".join(f"{n}[{p}]" for p, n in summary["processes"].items()) or "?"
    out.append(f"braid trace: {len(summary['files'])} file(s); processes: {procs}")
    for warning in summary.get("warnings", []):
        out.append(f"WARNING: {warning}")
    gpu = summary["gpu"]
    out.append("")
    if gpu["num_spans"]:
        out.append(f"GPU: busy {gpu['busy_fraction'] * 100:.1f}% of a {gpu['window_ms']:.3f} ms window "
                   f"({gpu['num_spans']} spans)")
        out.append(f"  {'stream':<44} {'spans':>7} {'busy ms':>12} {'busy':>7}")
        for s in gpu["per_stream"]:
            out.append(f"  {s['track']:<44} {s['spans']:>7} {s['busy_ms']:>12.3f} {s['busy_fraction'] * 100:>6.1f}%")
        if len(gpu["per_gpu"]) > 1:
            for g in gpu["per_gpu"]:
                out.append(f"  {g['gpu'] + ' (all streams)':<44} {g['spans']:>7} {g['busy_ms']:>12.3f} "
                           f"{g['busy_fraction'] * 100:>6.1f}%  (steady state {g['steady_busy_fraction']:.1%})")
        out.append(f"  {'GPU span':<44} {'count':>7} {'mean ms':>12} {'total ms':>12}")
        for n, d in gpu["span_names"].items():
            out.append(f"  {n:<44} {d['count']:>7} {d['mean_ms']:>12.3f} {d['total_ms']:>12.3f}")
        dbo = gpu.get("dbo_overlap")
        if dbo:
            out.append(f"  dual-batch overlap: compute {dbo['compute_ms']:.3f} ms, comm {dbo['comm_ms']:.3f} ms, "
                       f"together {dbo['on_ms']:.3f} ms -> overlap efficiency "
                       f"{_f(dbo['efficiency'] and dbo['efficiency'] * 100, '{:.1f}')}%")
    else:
        out.append("GPU: no GPU spans")
    st = summary["steps"]
    out.append("")
    if st["count"]:
        out.append(f"Steps: {st['count']}, {_f(st['steps_per_s'], '{:.2f}')} steps/s; CPU time per step: "
                   f"mean {_f(st['mean_ms'])} ms, median {_f(st['median_ms'])} ms, p90 {_f(st['p90_ms'])} ms")
    else:
        out.append("Steps: no 'step' spans")
    if summary["cpu_spans"]:
        out.append(f"  {'CPU span':<44} {'count':>7} {'mean ms':>12} {'per step ms':>12} {'total ms':>12}")
        for c in summary["cpu_spans"]:
            out.append(f"  {c['process'] + ' ' + c['name']:<44} {c['count']:>7} {c['mean_ms']:>12.3f} "
                       f"{_f(c['per_step_ms']):>12} {c['total_ms']:>12.3f}")
    gaps = summary["gaps"] if top is None else summary["gaps"][:top]
    out.append("")
    if gaps:
        out.append(f"Largest GPU idle gaps ({len(gaps)}):")
        out.append(f"  {'#':>3} {'at ms':>12} {'length ms':>10}  overlapping CPU spans (ms)")
        for i, g in enumerate(gaps, 1):
            ov = ", ".join(f"{o['name']} {o['overlap_ms']:.3f}" for o in g["overlapping"][:6]) or "(none)"
            where = f" [{g['gpu']}]" if len(gpu["per_gpu"]) > 1 else ""
            out.append(f"  {i:>3} {g['at_ms']:>12.3f} {g['length_ms']:>10.3f}  {ov}{where}")
    else:
        out.append("GPU idle gaps: none")
    if summary["counters"]:
        out.append("")
        out.append(f"  {'counter':<44} {'mean':>12} {'max':>12} {'last':>12}")
        for k, c in summary["counters"].items():
            out.append(f"  {k:<44} {c['mean']:>12.3f} {c['max']:>12.3f} {c['last']:>12.3f}")
    return "\n".join(out) + "\n"
