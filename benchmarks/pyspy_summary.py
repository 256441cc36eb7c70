"""Summarize py-spy raw (collapsed) stacks recorded with --threads [--subprocesses]: busy seconds per
process and thread, and the functions that take the most of each busy thread (self and inclusive).

    python benchmarks/pyspy_summary.py server.txt client.txt --rate 250 --out summary.json
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict

_PROCESS = re.compile(r'^process (\d+):"(.*)"$')
_THREAD = re.compile(r"^thread \((\w+)\)")


def _function(frame: str) -> str:
    """'name (path/file.py:123)' -> 'name (path/file.py)': lines of one function add up."""
    return re.sub(r":\d+\)$", ")", frame)


def read_stacks(path: str):
    """Yield (pid, command, thread, frames, samples) from one raw py-spy file."""
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue  # a frame's text can hold a newline: its stack is split and unusable
            frames = stack.split(";")
            pid, command = "", ""
            while frames and _PROCESS.match(frames[0]):  # --subprocesses: parent;child;...;the sampled one
                pid, command = _PROCESS.match(frames[0]).groups()
                frames = frames[1:]
            thread = ""
            if frames and _THREAD.match(frames[0]):
                thread = _THREAD.match(frames[0]).group(1)
                frames = frames[1:]
            yield pid, command, thread, frames, int(count)


def summarize(paths: list[str], rate: float, top: int = 25) -> list[dict]:
    threads: dict[tuple, dict] = {}
    for path in paths:
        for pid, command, thread, frames, samples in read_stacks(path):
            key = (path, pid, thread)
            entry = threads.setdefault(key, {"file": path, "pid": pid, "command": command[:120], "thread": thread,
                                             "main_thread": bool(pid) and thread == pid,
                                             "samples": 0, "self": Counter(), "inclusive": Counter()})
            entry["samples"] += samples
            if frames:
                entry["self"][_function(frames[-1])] += samples
            for name in {_function(f) for f in frames}:
                entry["inclusive"][name] += samples
    result = []
    for entry in sorted(threads.values(), key=lambda e: -e["samples"]):
        total = entry["samples"]
        result.append({
            **{k: entry[k] for k in ("file", "pid", "command", "thread", "main_thread", "samples")},
            "busy_s": total / rate,
            "self_top": [(name, n, n / total) for name, n in entry["self"].most_common(top)],
            "inclusive_top": [(name, n, n / total) for name, n in entry["inclusive"].most_common(top * 2)],
        })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--rate", type=float, required=True, help="py-spy's --rate (samples per second)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = summarize(args.files, args.rate, args.top)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    by_command = defaultdict(float)
    for entry in result:
        by_command[(entry["file"], entry["pid"], entry["command"])] += entry["busy_s"]
    print("busy CPU seconds per process:")
    for (file, pid, command), busy in sorted(by_command.items(), key=lambda kv: -kv[1]):
        print(f"  {busy:8.2f} s  {pid:>7} {command[:90]}")
    for entry in result[:4]:
        print(f"\n== {entry['command'][:70]} thread {entry['thread']} (main={entry['main_thread']}): "
              f"{entry['busy_s']:.2f} s busy")
        print("  self:")
        for name, n, share in entry["self_top"][:15]:
            print(f"    {share:6.1%}  {name[:110]}")
        print("  inclusive:")
        for name, n, share in entry["inclusive_top"][:30]:
            print(f"    {share:6.1%}  {name[:110]}")


if __name__ == "__main__":
    main()
