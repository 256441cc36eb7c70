"""Offline throughput of braid.LLM: random token-id prompts, greedy, ignore_eos.

    braid bench throughput --model /path/to/model --num-prompts 1000 --input-len 512 --output-len 128
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import numpy as np


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in row] for row in rng.integers(0, vocab_size, size=(num_prompts, input_len))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from braid import LLM
    from braid.engine.arg_utils import EngineArgs
    from braid.sampling_params import SamplingParams

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    engine_args = EngineArgs.from_cli_args(args)
    kwargs = {f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args) if f.name != "model"}
    llm = LLM(engine_args.model, **kwargs)
    config = llm.llm_engine.config
    vocab = min(config.model.vocab_size, len(llm.get_tokenizer()))
    if args.input_len + args.output_len > config.model.max_model_len:
        raise ValueError(f"--input-len + --output-len ({args.input_len + args.output_len}) exceeds "
                         f"--max-model-len {config.model.max_model_len}")
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    if args.num_warmups:
        # Compiles kernels and warms allocators; its prompts come from another seed (no prefix-cache hits).
        warm = random_prompts(args.num_warmups, args.input_len, vocab, engine_args.seed + 1_000_003)
        llm.generate(warm, SamplingParams(temperature=0, max_tokens=min(args.output_len, 8), ignore_eos=True),
                     use_tqdm=False)

    prompts = random_prompts(args.num_prompts, args.input_len, vocab, engine_args.seed)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start

    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_lens = [len(o.outputs[0].token_ids) for o in outputs]
    output_tokens = sum(output_lens)
    ttfts = [o.metrics.time_to_first_token for o in outputs if o.metrics and o.metrics.time_to_first_token is not None]
    summary = {
        "num_requests": len(outputs),
        "elapsed_s": elapsed,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_s": len(outputs) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "mean_ttft_ms": float(np.mean(ttfts)) * 1000 if ttfts else None,
    }
    config_out = {
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "num_warmups": args.num_warmups, "engine_args": dataclasses.asdict(engine_args),
        "resolved": {"model": config.model.model, "dtype": str(config.model.dtype).replace("torch.", ""),
                     "device": str(config.device.device), "attention_backend": config.device.attention_backend,
                     "max_model_len": config.model.max_model_len,
                     "max_num_batched_tokens": config.scheduler.max_num_batched_tokens},
        # The model's shape: with --load-format dummy the model path is often a temporary folder.
        "model_config": json.loads(config.model.hf_config.to_json_string(use_diff=False)),
    }
    return {"benchmark": "throughput", "config": config_out, "summary": summary, "output_lens": output_lens}


def main(args: argparse.Namespace) -> int:
    from braid.bench.run_info import run_info, write_result

    try:
        result = run(args)
    except ValueError as e:
        print(f"braid bench throughput: error: {e}", file=sys.stderr)
        return 2
    result["run_info"] = run_info()
    s = result["summary"]
    print(f"Throughput: {s['requests_per_s']:.2f} requests/s, {s['total_tokens_per_s']:.2f} total tokens/s, "
          f"{s['output_tokens_per_s']:.2f} output tokens/s ({s['num_requests']} requests, "
          f"{s['total_prompt_tokens']} prompt + {s['total_output_tokens']} output tokens in {s['elapsed_s']:.2f} s)")
    if args.result_json:
        write_result(args.result_json, result)
        print(f"wrote {args.result_json}")
    return 0


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from braid.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(parser, model_positional=False)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-warmups", type=int, default=1,
                        help="prompts run (8 tokens each, not timed) before measuring")
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--result-json", default=None)
    return parser


if __name__ == "__main__":
    p = add_cli_args(argparse.ArgumentParser(prog="braid bench throughput", description=__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    sys.exit(main(p.parse_args()))
