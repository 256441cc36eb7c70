"""What a full garbage collection costs the server's front end, with and without the start-up heap
frozen (braid/gc_heap.py): load the tokenizer of a model shape as `braid serve` does, then time
gc.collect() before and after freeze_startup_heap(). Host CPU work: runs anywhere.

    python benchmarks/gc_heap_cost.py --shape llama3-8b --out benchmarks/results/gc_heap_cost_llama3_8b_cpu.json
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time


def _collect_ms(repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "braid.bench.shapes", args.shape, model], check=True, capture_output=True)
    from braid.transformers_utils import load_tokenizer

    load_tokenizer(model)
    import braid.entrypoints.api_server  # noqa: F401 - the server stack, as in `braid serve`
    from braid.gc_heap import freeze_startup_heap

    tracked = len(gc.get_objects())
    before = _collect_ms(args.repeats)
    freeze_startup_heap()
    after = _collect_ms(args.repeats)
    from braid.bench.run_info import run_info

    result = {"benchmark": "gc_heap_cost", "config": vars(args), "run_info": run_info(),
              "tracked_objects": tracked, "frozen_objects": gc.get_freeze_count(),
              "full_collection_ms": {"unfrozen": before, "frozen": after},
              "median_ms": {"unfrozen": statistics.median(before), "frozen": statistics.median(after)}}
    print(f"{args.shape}: {tracked} tracked objects; full collection median "
          f"{result['median_ms']['unfrozen']:.1f} ms unfrozen, {result['median_ms']['frozen']:.1f} ms frozen")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
