"""Host time the frontend spends on one decode step's outputs (detokenize, stop strings,
RequestOutput objects), per request: it runs between two engine steps in `LLM.generate`,
so under pipeline parallelism it is paid once per micro-batch.

    python benchmarks/frontend_step.py --out benchmarks/results/frontend_step_cpu.json

Times OutputProcessor.process_outputs over --steps decode steps of --batch requests each
(one random token per request per step, as from random weights): the Python
prefix/read-offset detokenizer with every step's snapshot of each request (braid before
this benchmark), the Rust detokenizer stream with every snapshot (what streaming callers
get), and the Rust stream with final outputs only (what `LLM.generate` asks for);
median of --repeats.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import braid.engine.detokenizer as detokenizer
from braid.bench.run_info import run_info, write_result
from braid.engine.messages import EngineCoreOutput
from braid.engine.output_processor import OutputProcessor
from braid.sampling_params import SamplingParams
from braid.transformers_utils import default_model_path, load_tokenizer


def time_steps(tokenizer, batch: int, steps: int, seed: int, final_only: bool) -> float:
    """Seconds of process_outputs over the run."""
    rng = random.Random(seed)
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    for i in range(batch):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(32)]
        processor.add_request(str(i), None, prompt, [params])
    total = 0.0
    for step in range(steps):
        last = step == steps - 1
        outputs = [EngineCoreOutput(str(i), [rng.randrange(len(tokenizer))], finish_reason="length" if last else None)
                   for i in range(batch)]
        start = time.perf_counter()
        processor.process_outputs(outputs, final_only)
        total += time.perf_counter() - start
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    tokenizer = load_tokenizer(default_model_path())
    modes = (("python, every snapshot", None, False), ("rust, every snapshot", detokenizer.DecodeStream, False),
             ("rust, final only", detokenizer.DecodeStream, True))
    rust_stream = detokenizer.DecodeStream
    per_step_ms: dict[str, list[float]] = {name: [] for name, _, _ in modes}
    for seed in range(a.repeats):  # modes round-robin: a busy host slows them alike
        for name, stream, final_only in modes:
            detokenizer.DecodeStream = stream
            per_step_ms[name].append(time_steps(tokenizer, a.batch, a.steps, seed, final_only) / a.steps * 1e3)
    detokenizer.DecodeStream = rust_stream
    rows = {}
    for name, times in per_step_ms.items():
        median = statistics.median(times)
        rows[name] = dict(per_step_ms=times, median_step_ms=median, us_per_request_token=median * 1e3 / a.batch)
        print(f"{name:>22}: {median:.2f} ms per step of {a.batch} ({median * 1e3 / a.batch:.1f} us per request-token)")
    write_result(a.out, dict(benchmark="frontend_step", **run_info(), tokenizer="SmolLM2-135M-Instruct (GGUF)",
                             batch=a.batch, steps=a.steps, repeats=a.repeats, paths=rows))


if __name__ == "__main__":
    main()
