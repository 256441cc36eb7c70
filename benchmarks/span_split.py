"""Print the GPU layer-span totals (attention, moe_experts, moe_dispatch, ...) of the traced
runs in w1_throughput.py result files: where a step's GPU time goes.

    python benchmarks/span_split.py RESULT.json [...]
"""
import json
import sys

for path in sys.argv[1:]:
    result = json.load(open(path))
    for engine, runs in result["runs"].items():
        for run in runs:
            names = ((run.get("trace_summary") or {}).get("gpu") or {}).get("span_names") or {}
            print(f"{result['shape']} {engine}: " + ", ".join(f"{k} {v['total_ms'] / 1e3:.2f} s"
                                                          for k, v in names.items()))
