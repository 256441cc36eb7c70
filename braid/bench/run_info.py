"""Facts every benchmark result records: GPU, host, versions, commit, time."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch


KERNEL_SWITCHES = ("BRAID_PDL", "BRAID_SKINNY_GEMM")


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_python_ms(repeats: int = 5) -> float:
    """Median ms of a fixed pure-Python workload (dicts, lists, small objects, as in the
    scheduler's per-step work). The engine's host work scales with it: a W1 run on a host
    where this is 20% slower shows every host span ~20% slower, on the same GPU."""
    def workload() -> int:
        table: dict[str, list[int]] = {}
        for i in range(20_000):
            table.setdefault(f"req-{i % 512}", []).append(i)
        return sum(len(v) for v in sorted(table.values(), key=len))

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        workload()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def host_info() -> dict:
    return {"cpu": _cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "python_workload_ms": round(host_python_ms(), 3)}


def run_info() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "git_commit": os.environ.get("BRAID_GIT_COMMIT") or git_commit(),
        "host": host_info(),
        # Kernel switches read from the environment, for A/B runs (named: never a secret like BRAID_API_KEY).
        "braid_env": {k: os.environ[k] for k in KERNEL_SWITCHES if k in os.environ},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def write_result(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
