"""Per-stage GPU busy of a pipeline-parallel run in its decode steady state, from a trace
directory (`--trace-dir`, one run's worker traces).

W1 comes in waves: every wave starts with prefill chunks that fill the pipeline stage by
stage, so busy over the whole run (or its middle) mixes the pipeline's fill and drain into
the steady state. Here the steady state is each stretch of decode passes on the last stage
(forward spans under --max-pass-ms, by default 1.5x the median forward: W1's passes are mostly
decode, and a 70B stage's decode pass takes longer than an 8B stage's; no gap over --max-gap-ms) lasting over --min-segment-ms,
trimmed by 10% at both ends; every stage's busy (forward + sample spans) is measured over
those same stretches of time.

    python benchmarks/pp_decode_busy.py /tmp/trace-llama3-8b-pp4ms/braid-pp4-async-ms8-run1
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics


def load_gpu_spans(trace_dir: str) -> dict[int, list[tuple[float, float, str]]]:
    """rank -> sorted (start us, duration us, name) of its GPU forward and sample spans."""
    spans = {}
    for path in glob.glob(os.path.join(trace_dir, "braid-trace-worker-*.json")):
        rank = int(re.search(r"worker-(\d+)-", os.path.basename(path)).group(1))
        events = json.load(open(path))["traceEvents"]
        gpu_tids = {e["tid"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
                    and str(e.get("args", {}).get("name", "")).startswith("GPU")}
        spans[rank] = sorted((e["ts"], e["dur"], e["name"]) for e in events
                             if e.get("ph") == "X" and e.get("tid") in gpu_tids and e["name"] in ("forward", "sample"))
    return spans


def decode_segments(last_stage, max_pass_us: float, max_gap_us: float, min_segment_us: float):
    """(start, end) of each long stretch of back-to-back decode passes on the last stage."""
    segments, current = [], []

    def close():
        if current and current[-1][0] + current[-1][1] - current[0][0] >= min_segment_us:
            segments.append((current[0][0], current[-1][0] + current[-1][1]))
        current.clear()

    for span in last_stage:
        start, dur, name = span
        if name == "forward" and dur > max_pass_us:  # a prefill chunk
            close()
            continue
        if current and start - (current[-1][0] + current[-1][1]) > max_gap_us:
            close()
        current.append(span)
    close()
    return [(s + 0.1 * (e - s), e - 0.1 * (e - s)) for s, e in segments]


def busy_in(spans, t0: float, t1: float) -> float:
    return sum(max(0.0, min(t1, s + d) - max(t0, s)) for s, d, _ in spans)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace_dir")
    p.add_argument("--max-pass-ms", type=float, default=None, help="default: 1.5 x the last stage's median forward")
    p.add_argument("--max-gap-ms", type=float, default=1.0)
    p.add_argument("--min-segment-ms", type=float, default=200.0)
    args = p.parse_args()
    spans = load_gpu_spans(args.trace_dir)
    last = max(spans)
    max_pass_us = (args.max_pass_ms * 1e3 if args.max_pass_ms is not None
                   else 1.5 * statistics.median(d for _, d, n in spans[last] if n == "forward"))
    segments = decode_segments(spans[last], max_pass_us, args.max_gap_ms * 1e3, args.min_segment_ms * 1e3)
    total = sum(e - s for s, e in segments)
    if not total:
        raise SystemExit("no decode segment found")
    for s, e in segments:
        passes = sum(1 for t, _, n in spans[last] if n == "forward" and s <= t < e)
        print(f"segment {(e - s) / 1e3:7.1f} ms, {passes} passes ({(e - s) / passes:.0f} us each): busy per stage "
              + " ".join(f"{100 * busy_in(spans[r], s, e) / (e - s):5.1f}%" for r in sorted(spans)))
    print(f"all segments ({total / 1e3:.0f} ms): busy per stage "
          + " ".join(f"{100 * sum(busy_in(spans[r], s, e) for s, e in segments) / total:5.1f}%" for r in sorted(spans)))


if __name__ == "__main__":
    main()
