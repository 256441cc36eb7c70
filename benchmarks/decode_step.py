"""Decode step time at several batch sizes against its floor.

Runs the engine core on random weights of a real model shape: B requests with
a `--context`-token prompt are prefilled, then full engine steps (schedule,
inputs, forward, sample, outputs) are timed while every request decodes.
Floor = (weight bytes + KV bytes read) / measured copy bandwidth.

    python benchmarks/decode_step.py --shape llama3-8b --batch-sizes 1,64,256 --out result.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from braid.bench.floors import decode_bytes, measure_copy_bandwidth, measure_matmul_rate
from braid.bench.run_info import run_info, write_result
from braid.bench.shapes import write_shape
from braid.engine.arg_utils import EngineArgs
from braid.engine.core import EngineCore
from braid.engine.messages import EngineCoreRequest
from braid.sampling_params import SamplingParams


def time_decode_steps(core: EngineCore, batch: int, context: int, steps: int, vocab: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    ids = []
    for i in range(batch):
        prompt = torch.randint(0, vocab, (context,), generator=g).tolist()
        req_id = f"b{batch}-{i}"
        ids.append(req_id)
        # Early requests decode while later ones prefill: leave room for those tokens too.
        params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True)
        core.add_request(EngineCoreRequest(req_id, prompt, params))
    # Prefill: step until every request has its first token.
    started: set[str] = set()
    while len(started) < batch:
        for out in core.step().outputs:
            started.add(out.request_id)
    # Steps back to back, no device sync in between (that would undo async scheduling):
    # a step's time is the interval between two consecutive batches of tokens.
    times, kv_tokens = [], []
    torch.cuda.synchronize()
    last = time.perf_counter()
    while len(times) < steps:
        context = sum(r.num_tokens for r in core.scheduler.running)
        outs = core.step().outputs
        if not outs:  # async scheduling's first call only launches
            continue
        kv_tokens.append(context)
        now = time.perf_counter()
        times.append(now - last)
        last = now
        assert len(outs) == batch, f"expected a token for all {batch} requests, got {len(outs)}"
    core.abort_requests(ids)
    while core.has_unfinished_requests():  # report the batch still in flight
        core.step()
    kv = core.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks, "KV blocks leaked"
    return times, kv_tokens


def step_floor(hf, num_params: int, num_kv_heads: int, head_dim: int, batch: int, context: float) -> tuple[int, int]:
    """(bytes a decode step must read, FLOPs of its matmuls) for `batch` requests of `context` tokens.
    The input embedding table is only gathered (`batch` rows), never multiplied, unless it is
    tied to the LM head: then num_params counts it once, and the LM head reads and multiplies it."""
    embed_params = 0 if hf.tie_word_embeddings else hf.vocab_size * hf.hidden_size
    nbytes = decode_bytes(num_params, embed_params, hf.hidden_size, batch, context, hf.num_hidden_layers,
                          num_kv_heads, head_dim, 2)
    return nbytes, 2 * (num_params - embed_params) * batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per batch size (median of their medians)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]

    bw = measure_copy_bandwidth()
    flops = measure_matmul_rate()
    engine_args = EngineArgs(model=write_shape(args.shape), load_format="dummy", dtype="bfloat16",
                             max_model_len=args.context + args.steps + 128, max_num_seqs=max(batches),
                             max_num_batched_tokens=8192, enable_prefix_caching=False,
                             attention_backend=args.attention_backend, async_scheduling=args.async_scheduling,
                             enforce_eager=args.enforce_eager)
    config = engine_args.create_engine_config()
    core = EngineCore(config)
    model = core.executor.worker.model_runner.model
    hf = config.model.hf_config
    num_params = sum(p.numel() for p in model.parameters())

    rows = []
    for batch in batches:
        run_medians, times, kv_tokens = [], [], []
        for r in range(args.repeats):
            run_times, run_kv = time_decode_steps(core, batch, args.context, args.steps, hf.vocab_size,
                                                  seed=batch * 1000 + r)
            run_medians.append(statistics.median(run_times[3:]))  # the first steps warm up
            times += run_times
            kv_tokens += run_kv[3:]
        median = statistics.median(run_medians)
        # KV read per step, from the contexts actually present during the timed steps.
        mean_context = statistics.mean(kv_tokens) / batch
        floor_bytes, step_flops = step_floor(hf, num_params, config.model.num_kv_heads, config.model.head_dim,
                                             batch, mean_context)
        floor = floor_bytes / bw
        # For reference: the matmuls' FLOPs at the measured rate (large batches approach it too).
        compute_floor = step_flops / flops
        rows.append(dict(batch=batch, context=args.context, mean_context_timed=mean_context, step_ms_median=median * 1e3,
                         run_medians_ms=[m * 1e3 for m in run_medians],
                         step_ms_all=[t * 1e3 for t in times], floor_ms=floor * 1e3, floor_bytes=floor_bytes,
                         compute_floor_ms=compute_floor * 1e3, ratio_to_floor=median / floor))
    result = dict(benchmark="decode_step", **run_info(), shape=args.shape, model_config=hf.to_dict(),
                  params=num_params, copy_bandwidth_Bps=bw, matmul_flops=flops,
                  engine=dict(dtype="bfloat16", block_size=config.cache.block_size,
                              attention_backend=config.device.attention_backend,
                              cuda_graphs=core.executor.worker.model_runner.cuda_graphs is not None,
                              async_scheduling=args.async_scheduling,
                              num_kv_blocks=core.num_blocks),
                  results=rows)
    write_result(args.out, result)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s, params {num_params / 1e9:.2f} B")
    print(f"{'batch':>6} {'step ms':>9} {'floor ms':>9} {'x floor':>8} {'matmul FLOP floor ms':>21}  runs")
    for r in rows:
        print(f"{r['batch']:>6} {r['step_ms_median']:>9.2f} {r['floor_ms']:>9.2f} {r['ratio_to_floor']:>8.2f} "
              f"{r['compute_floor_ms']:>21.2f}  {' '.join(f'{m:.2f}' for m in r['run_medians_ms'])}")


if __name__ == "__main__":
    main()
