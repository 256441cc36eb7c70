"""Host time of the engine core's bookkeeping per decode step, per request: schedule()
plus update_from_output(), no model. W1's shape: 512 requests of 512 prompt tokens,
--max-num-seqs 256, block size 16, prefix caching on; timed over 100 decode steps after
the prefills (contexts of ~530-630 tokens), median of --repeats.

    python benchmarks/scheduler_step.py --out benchmarks/results/scheduler_step_cpu_2core.json
"""
from __future__ import annotations

import argparse
import statistics
import time

from braid.bench.run_info import run_info, write_result
from braid.config import SchedulerConfig
from braid.core.kv_cache_manager import KVCacheManager
from braid.core.request import Request
from braid.core.scheduler import Scheduler
from braid.core.scheduler_output import ModelRunnerOutput
from braid.engine.messages import EngineCoreRequest
from braid.sampling_params import SamplingParams


def us_per_request_step(num_requests: int, max_num_seqs: int, prompt_len: int) -> float:
    sched = Scheduler(SchedulerConfig(max_model_len=1024, max_num_seqs=max_num_seqs, max_num_batched_tokens=8192),
                      KVCacheManager(20000, 16, enable_caching=True))
    for i in range(num_requests):
        prompt = [(i * 31 + j) % 5000 for j in range(prompt_len)]
        sched.add_request(Request(EngineCoreRequest(str(i), prompt, SamplingParams(max_tokens=256, ignore_eos=True),
                                                    0.0), 16))

    def step() -> int:
        out = sched.schedule()
        ids = list(out.num_scheduled_tokens)
        done = [sched.requests[r].num_computed_tokens + out.num_scheduled_tokens[r] >= sched.requests[r].num_tokens
                for r in ids]
        sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, sampled_token_ids=[[7] if d else [] for d in done],
                                                        logprobs=[None] * len(ids)))
        return len(ids)

    for _ in range(40):  # the prefills
        step()
    start, rows = time.perf_counter(), 0
    for _ in range(100):
        rows += step()
    return (time.perf_counter() - start) / rows * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    runs = [us_per_request_step(512, 256, 512) for _ in range(a.repeats)]
    median = statistics.median(runs)
    print(f"schedule + update_from_output: {median:.2f} us per request per decode step "
          f"({median * 256 / 1e3:.2f} ms per step of 256)")
    write_result(a.out, dict(benchmark="scheduler_step", **run_info(), num_requests=512, max_num_seqs=256,
                             prompt_len=512, block_size=16, runs_us=runs, median_us_per_request_step=median))


if __name__ == "__main__":
    main()
