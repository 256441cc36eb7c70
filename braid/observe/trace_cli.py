"""`braid trace summarize DIR`: registered on the top-level CLI by add_trace_subparsers."""
from __future__ import annotations

import argparse
import sys


def _summarize(args: argparse.Namespace) -> int:
    import json

    from braid.observe.trace_summary import format_summary, summarize, trace_files

    try:
        if not trace_files(args.paths):
            print(f"braid trace: no trace files in {' '.join(args.paths)}", file=sys.stderr)
            return 1
        summary = summarize(args.paths, top=args.top)
    except FileNotFoundError as e:
        print(f"braid trace: no such file or directory: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    return 0


def add_trace_subparsers(subparsers) -> argparse.ArgumentParser:
    """Add `trace` (with `summarize`) to an argparse subparsers object; `summarize` sets `func`,
    which takes the parsed args and returns an exit code. Imports nothing heavy."""
    trace = subparsers.add_parser("trace", help="step-timeline traces (written with --trace-dir)")
    sub = trace.add_subparsers(dest="trace_command", required=True)
    p = sub.add_parser("summarize", help="GPU busy fraction, CPU time per step and the largest GPU idle gaps",
                       description="Summarize the braid-trace-*.json files of a directory (or the given files).")
    p.add_argument("paths", nargs="+", metavar="DIR",
                   help="a directory of braid-trace-*.json files (one per process), or trace files")
    p.add_argument("--top", type=int, default=10, help="how many of the largest GPU idle gaps to list (default 10)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON to FILE")
    p.set_defaults(func=_summarize)
    return trace
