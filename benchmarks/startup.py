"""How long `LLM()` takes to open the default model (SmolLM2 GGUF) in a fresh process.

Each sample is a new Python process that imports braid and builds LLM() on CPU; the
time includes imports, the GGUF reader, the tokenizer and the weights. "cold" starts
with an empty tokenizer cache (BRAID_CACHE_ROOT pointed at a fresh folder), "warm"
reuses the folder the previous sample filled. --braid-dir times another checkout's braid
(e.g. a `git worktree` of an older commit) in the child processes.

    python benchmarks/startup.py --repeats 3 --out benchmarks/results/startup_smollm2_cpu.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from braid.bench.run_info import run_info, write_result

CHILD = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, BRAID_DIR)
import braid
assert braid.__file__.startswith(BRAID_DIR), braid.__file__
from braid import LLM
LLM(max_model_len=1024, kv_cache_memory="256MiB")
print(f"STARTUP_S {time.perf_counter() - t0:.3f}")
"""


def one_start(cache_root: str, braid_dir: str) -> float:
    env = dict(os.environ, BRAID_CACHE_ROOT=cache_root)
    code = f"BRAID_DIR = {braid_dir!r}\n" + CHILD
    # cwd: `python -c` puts the working folder first on sys.path, where a checkout's braid would win.
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cache_root, capture_output=True, text=True,
                         check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("STARTUP_S")))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--braid-dir", default="", help="import braid from this checkout in the timed processes")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    braid_dir = os.path.abspath(args.braid_dir or os.path.join(os.path.dirname(__file__), ".."))
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as root:
            cold.append(one_start(root, braid_dir))
            warm.append(one_start(root, braid_dir))
    info = run_info()
    if args.braid_dir:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=braid_dir, capture_output=True,
                                            text=True).stdout.strip()
    result = dict(info, benchmark="startup", braid_dir=braid_dir, device="cpu",
                  model="SmolLM2-135M-Instruct.Q4_1.gguf (default)", cold_s=cold, warm_s=warm,
                  cold_median_s=statistics.median(cold), warm_median_s=statistics.median(warm))
    write_result(args.out, result)
    print(f"LLM() in a fresh process: cold cache {statistics.median(cold):.2f} s, warm {statistics.median(warm):.2f} s "
          f"(medians of {args.repeats})")


if __name__ == "__main__":
    main()
