"""Dual-batch overlap step times (issue 8): a MoE shape (dummy bf16) with data parallelism
x expert parallelism, decode at 64/128/256 tokens per rank and prefill at 4096 tokens per
rank, DBO off, on (threshold policy) and auto.

Decode step = the median of S engine steps timed one by one once every request is decoding,
pooled over the repeats (every rank holding B requests); with --subtract, as before: (time to
generate 1 + S tokens - time to generate 1) / S, whose two medians of whole runs carried ~1.5 ms
of noise per step. Prefill step = one step of 8 x 512 prompt tokens per rank (max_tokens 1).
Every shape runs once untimed first (kernel compilation), then medians of --repeats.
--interleave keeps every mode's engine alive and times them round-robin (separate
runs of one mode differed by up to 18%). Slow links: run under NCCL_P2P_DISABLE=1 (no NVLink peer access;
traffic through host memory, as across machines).

    python benchmarks/dbo_step.py --dp 2 --modes off,on --out $OUT/dbo_dp2.json
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

from braid.bench.run_info import run_info, write_result
from braid.bench.shapes import SHAPES, write_shape


def _timed(llm, prompts, max_tokens: int) -> float:
    from braid import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0


def _decode_steps_ms(llm, prompts, steps: int) -> list[float]:
    """Each decode step's wall time (ms), stepped by hand: the steps after the prompts' own."""
    from braid import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=3 + steps, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"decode-{time.monotonic_ns()}-{i}", {"prompt_token_ids": p}, params)
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step(final_only=True)
        times.append((time.perf_counter() - t0) * 1e3)
    # The first steps run the prompts (and the first decode after them); the last ones drain.
    return times[-1 - steps:-1]


def build(model_dir: str, args, mode: str, **extra):
    from braid import LLM

    tp = args.tp
    return LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=max(1024, args.prefill // 8 + 64), max_num_seqs=256,
               max_num_batched_tokens=args.prefill, enable_prefix_caching=False, data_parallel_size=args.dp,
               tensor_parallel_size=tp, enable_expert_parallel=args.dp * tp > 1 and args.ep,
               enable_dbo=mode != "off", dbo_policy="auto" if mode == "auto" else "threshold",
               enforce_eager=args.eager, trace_dir=f"{args.trace_dir}/{mode}" if args.trace_dir else None, **extra)


def measure_interleaved(model_dir: str, args, modes: list[str], vocab: int, on_shape=None) -> list[dict]:
    """Every mode's engine alive at once (KV pools capped so they fit); each shape warmed on
    every engine, then timed round-robin over the modes, so drift of the host or the GPUs
    between modes (up to ~18% between separate runs) falls on all of them alike."""
    llms = {mode: build(model_dir, args, mode, kv_cache_memory=args.kv_cache_memory) for mode in modes}
    g = torch.Generator().manual_seed(0)
    out = {mode: dict(mode=mode, interleaved=True, decode={}, prefill=None) for mode in modes}
    try:
        for llm in llms.values():
            _timed(llm, torch.randint(0, vocab, (8 * args.dp, 32), generator=g).tolist(), 4)  # compile kernels
        shapes = [("decode", int(b)) for b in args.decode.split(",") if b] + [("prefill", args.prefill)]
        for kind, size in shapes:
            n, length = (size * args.dp, 64) if kind == "decode" else (8 * args.dp, size // 8)
            ps = torch.randint(0, vocab, (n, length), generator=g).tolist()
            tokens = 1 + args.steps if kind == "decode" else 1
            for llm in llms.values():
                _timed(llm, ps, tokens)  # every shape of this size compiled and captured before timing
            times = {mode: ([], []) for mode in modes}
            for _ in range(args.repeats):
                for mode, llm in llms.items():
                    if kind == "decode" and not args.subtract:
                        times[mode][0].extend(_decode_steps_ms(llm, ps, args.steps))
                        continue
                    if kind == "decode":
                        times[mode][0].append(_timed(llm, ps, 1))
                    times[mode][1].append(_timed(llm, ps, tokens))
            for mode in modes:
                one, many = times[mode]
                if kind == "decode" and not args.subtract:
                    step = statistics.median(one)
                    out[mode]["decode"][size] = dict(step_ms=step, steps_ms=one)
                elif kind == "decode":
                    step = (statistics.median(many) - statistics.median(one)) / args.steps * 1e3
                    out[mode]["decode"][size] = dict(step_ms=step, t1_s=one, tS_s=many)
                else:
                    step = statistics.median(many) * 1e3
                    out[mode]["prefill"] = dict(tokens_per_rank=size, step_ms=step, runs_s=many)
                print(f"{mode:>4} {kind} {size:>4} tokens/rank: {step:.2f} ms/step", flush=True)
            if on_shape is not None:  # what is measured so far survives a later failure
                on_shape(list(out.values()))
    finally:
        for llm in llms.values():
            llm.llm_engine.engine_core.shutdown()
    return list(out.values())


def measure(model_dir: str, args, mode: str, vocab: int) -> dict:
    llm = build(model_dir, args, mode)
    g = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int):
        return torch.randint(0, vocab, (n, length), generator=g).tolist()

    _timed(llm, prompts(8 * args.dp, 32), 4)  # compile kernels
    print(f"{mode:>3} warm", flush=True)  # (dbo_profile.sh starts sampling here)
    out = dict(mode=mode, decode={}, prefill=None)
    for batch in [int(b) for b in args.decode.split(",") if b]:
        ps = prompts(batch * args.dp, 64)
        _timed(llm, ps, 1 + args.steps)  # every shape of this batch compiled before timing
        if args.subtract:
            one = statistics.median(_timed(llm, ps, 1) for _ in range(args.repeats))
            many = statistics.median(_timed(llm, ps, 1 + args.steps) for _ in range(args.repeats))
            out["decode"][batch] = dict(step_ms=(many - one) / args.steps * 1e3, t1_s=one, tS_s=many)
        else:
            each = [t for _ in range(args.repeats) for t in _decode_steps_ms(llm, ps, args.steps)]
            out["decode"][batch] = dict(step_ms=statistics.median(each), steps_ms=each)
        print(f"{mode:>4} decode {batch:>4} tokens/rank: {out['decode'][batch]['step_ms']:.2f} ms/step", flush=True)
    ps = prompts(8 * args.dp, args.prefill // 8)
    _timed(llm, ps, 1)
    out["prefill"] = dict(tokens_per_rank=args.prefill,
                          step_ms=statistics.median(_timed(llm, ps, 1) for _ in range(args.repeats)) * 1e3)
    print(f"{mode:>4} prefill {args.prefill} tokens/rank: {out['prefill']['step_ms']:.2f} ms/step", flush=True)
    llm.llm_engine.engine_core.shutdown()
    if args.trace_dir:  # overlap efficiency of the split steps that ran eagerly (their segments)
        from braid.observe.trace_summary import summarize

        out["dbo_overlap"] = summarize(f"{args.trace_dir}/{mode}")["gpu"].get("dbo_overlap")
        if out["dbo_overlap"]:
            d = out["dbo_overlap"]
            print(f"{mode:>4} overlap: compute {d['compute_ms']:.1f} ms, comm {d['comm_ms']:.1f} ms, together "
                  f"{d['on_ms']:.1f} ms, efficiency {d['efficiency']}", flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="deepseek-v2-lite", choices=sorted(SHAPES))
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="1: expert parallelism over the DP x TP ranks")
    p.add_argument("--modes", default="off,on,auto", help="off, on (--dbo-policy threshold), auto")
    p.add_argument("--decode", default="64,128,256", help="decode tokens per rank, comma separated ('' for none)")
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (every mode)")
    p.add_argument("--subtract", action="store_true",
                   help="decode step from whole runs of 1 and 1 + S tokens (the earlier method)")
    p.add_argument("--trace-dir", default=None, help="trace each mode's run here and report overlap efficiency")
    p.add_argument("--interleave", action="store_true",
                   help="all modes' engines at once, timed round-robin (less drift between modes)")
    p.add_argument("--kv-cache-memory", default="6GiB", help="each engine's KV pool with --interleave")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model_dir = write_shape(args.shape)
    result = dict(benchmark="dbo_step", **run_info(), shape=args.shape, dp=args.dp, tp=args.tp, ep=bool(args.ep),
                  eager=args.eager, nccl_p2p_disabled=os.environ.get("NCCL_P2P_DISABLE") == "1", runs=[])
    if args.interleave:
        def save(runs):
            result["runs"] = runs
            write_result(args.out, result)

        save(measure_interleaved(model_dir, args, args.modes.split(","), SHAPES[args.shape]["vocab_size"], save))
        return
    for mode in args.modes.split(","):
        try:
            result["runs"].append(measure(model_dir, args, mode, SHAPES[args.shape]["vocab_size"]))
        except Exception as e:  # noqa: BLE001 - keep the other mode's numbers
            result["runs"].append(dict(mode=mode, error=f"{type(e).__name__}: {e}"[:2000]))
            print(f"{mode}: ERROR {result['runs'][-1]['error'][:400]}")
        gc.collect()
        torch.cuda.empty_cache()
        write_result(args.out, result)


if __name__ == "__main__":
    main()
