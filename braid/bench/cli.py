"""`braid bench serve|throughput|plot`: registered on the top-level CLI by add_bench_subparsers."""
from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from braid.bench import serve

    return serve.main(args)


def _throughput(args: argparse.Namespace) -> int:
    from braid.bench import throughput

    return throughput.main(args)


def _plot(args: argparse.Namespace) -> int:
    from braid.bench import plot

    argv = list(args.results) + ["-o", args.output] + (["--labels", args.labels] if args.labels else [])
    return plot.main(argv)


def add_bench_subparsers(subparsers) -> argparse.ArgumentParser:
    """Add `bench` (with `serve`, `throughput` and `plot`) to an argparse subparsers object;
    each sets `func`, which takes the parsed args and returns an exit code."""
    from braid.bench import serve, throughput

    bench = subparsers.add_parser("bench", help="benchmarks: an OpenAI-compatible server, or the offline engine")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    serve.add_cli_args(sub.add_parser("serve", help="load-test any OpenAI-compatible server (braid, vLLM, SGLang)",
                                      description=serve.__doc__, formatter_class=fmt)).set_defaults(func=_serve)
    throughput.add_cli_args(sub.add_parser("throughput", help="offline throughput of braid.LLM",
                                           description=throughput.__doc__, formatter_class=fmt)
                            ).set_defaults(func=_throughput)
    p = sub.add_parser("plot", help="overlay `bench serve` result JSON files (e.g. braid vs vLLM) in one PNG")
    p.add_argument("results", nargs="+")
    p.add_argument("--labels", default=None, help="comma-separated, one per file")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_plot)
    return bench
