"""Plots of `braid bench serve` sweeps: latency percentiles and throughput against concurrency
(or request rate), one line per server, so braid and vLLM/SGLang results overlay.

    python -m braid.bench.plot braid.json vllm.json --labels braid,vllm -o compare.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))


def _x_axis(runs_by_label: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    """Concurrency when it varies (or rate never does), else request rate."""
    concurrency = {r["max_concurrency"] for runs in runs_by_label.values() for r in runs}
    rates = {r["request_rate"] for runs in runs_by_label.values() for r in runs}
    if len(concurrency) > 1 or len(rates) <= 1:
        return "max_concurrency", "max concurrency (inf = unbounded)"
    return "request_rate", "request rate, req/s (inf = all at once)"


def _points(runs: list[dict[str, Any]], key: str, metric: str) -> tuple[list[float], list[float]]:
    pts = []
    for r in runs:
        x, y = r[key], r["summary"].get(metric)
        if y is None:
            continue
        pts.append((math.inf if x is None else float(x), float(y)))
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs_by_label: dict[str, list[dict[str, Any]]], path: str, title: str | None = None) -> None:
    """Six panels: median and p99 of TTFT, TPOT, ITL and E2E latency (ms); output token
    throughput; and output throughput against median TPOT (the throughput/latency trade-off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, xlabel = _x_axis(runs_by_label)
    finite = [r[key] for runs in runs_by_label.values() for r in runs if r[key] is not None]
    inf_x = (max(finite) * 2 if finite else 1.0)  # where "unbounded" is drawn

    def xs(values: list[float]) -> list[float]:
        return [inf_x if math.isinf(v) else v for v in values]

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    panels = list(axes.flat)
    for label, runs in runs_by_label.items():
        for ax, (metric, name) in zip(panels[:4], LATENCIES):
            x, y = _points(runs, key, f"median_{metric}_ms")
            line, = ax.plot(xs(x), y, marker="o", label=f"{label} median")
            x, y = _points(runs, key, f"p99_{metric}_ms")
            ax.plot(xs(x), y, marker="x", linestyle="--", color=line.get_color(), label=f"{label} p99")
            ax.set_title(f"{name} (ms)")
        x, y = _points(runs, key, "output_throughput")
        line, = panels[4].plot(xs(x), y, marker="o", label=f"{label} output tok/s")
        x, y = _points(runs, key, "total_token_throughput")
        panels[4].plot(xs(x), y, marker="x", linestyle="--", color=line.get_color(), label=f"{label} total tok/s")
        panels[4].set_title("Throughput (tokens/s)")
        pts = sorted((r["summary"].get("median_tpot_ms"), r["summary"].get("output_throughput"), r[key])
                     for r in runs if r["summary"].get("median_tpot_ms") is not None)
        panels[5].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for tpot, tput, x in pts:
            panels[5].annotate("inf" if x is None else f"{x:g}", (tpot, tput), textcoords="offset points",
                               xytext=(4, 4), fontsize=8)
    panels[5].set_title("Output tok/s vs median TPOT (points labelled by x)")
    panels[5].set_xlabel("median TPOT (ms)")
    panels[5].set_ylabel("output tokens/s")
    values = {r[key] for runs in runs_by_label.values() for r in runs}
    ticks = sorted(inf_x if v is None else v for v in values)
    wide = len(ticks) > 1 and ticks[-1] / max(ticks[0], 1e-9) > 8
    for ax in panels[:5]:
        ax.set_xlabel(xlabel)
        if wide:
            ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels(["inf" if t == inf_x and None in values else f"{t:g}" for t in ticks])
        ax.minorticks_off()
    for ax in panels:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Serving benchmark: " + ", ".join(runs_by_label))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m braid.bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="--result-json files of `braid bench serve`")
    parser.add_argument("--labels", default=None, help="comma-separated, one per file (default: model names)")
    parser.add_argument("-o", "--output", required=True, help="PNG path")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [None] * len(args.results)
    if len(labels) != len(args.results):
        parser.error("--labels needs one label per file")
    runs_by_label = {}
    for path, label in zip(args.results, labels):
        with open(path) as f:
            data = json.load(f)
        label = label or str(data.get("model", path))
        if label in runs_by_label:
            label = f"{label} ({path})"
        runs_by_label[label] = data["runs"]
    plot_runs(runs_by_label, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
