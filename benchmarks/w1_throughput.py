"""W1: offline throughput on the Llama-3-8B shape, braid against HF transformers'
continuous batching (`generate_batch`), with the workload's floor from measured ceilings.

512 requests of 512 random prompt tokens, 256 output tokens each (ignore_eos),
dummy bf16 weights. Floor = prefill FLOPs / matmul rate + sum over decode steps of
(weight bytes + KV bytes read) / copy bandwidth, for waves of --max-num-seqs requests.

    python benchmarks/w1_throughput.py --engines braid,hf --out w1.json
"""
from __future__ import annotations

import argparse
import gc
import inspect
import time

import torch

from braid.bench.floors import measure_copy_bandwidth, measure_matmul_rate
from braid.bench.run_info import run_info, write_result
from braid.bench.shapes import SHAPES, write_shape


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def _attention_params(cfg: dict) -> tuple[int, int]:
    """(attention matmul parameters per layer, KV-cache bytes per token per layer) in bf16."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("kv_lora_rank"):  # multi-head latent attention: one compressed entry per token
        r, rope, nope, v = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
        params = h * heads * (nope + rope) + h * (r + rope) + r * heads * (nope + v) + heads * v * h
        return params, 2 * (r + rope)
    head_dim = cfg.get("head_dim") or h // heads
    kv_heads = cfg["num_key_value_heads"]
    return h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h, 2 * 2 * kv_heads * head_dim


def _attention_widths(cfg: dict) -> tuple[int, int]:
    """(width of Q.K^T, width of P.V) summed over heads: the attention matmuls' inner sizes.
    Not hidden_size in general (Qwen3-30B-A3B: 32 heads x 128 = 4096 vs 2048; MLA prefill:
    heads x (nope + rope) for Q.K^T, heads x v_head_dim for P.V)."""
    heads = cfg["num_attention_heads"]
    if cfg.get("kv_lora_rank"):
        return heads * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]), heads * cfg["v_head_dim"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return heads * head_dim, heads * head_dim


def _mlp_params(cfg: dict, batch: int) -> tuple[float, float]:
    """(MLP parameters read per step for `batch` tokens, MLP parameters used per token), summed over layers.
    MoE layers read the experts the batch touches (expected distinct of E drawn k at a time)."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
    dense = 3 * h * cfg["intermediate_size"]
    if not experts:
        return layers * dense, layers * dense
    k, inter = cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    shared = 3 * h * inter * (cfg.get("n_shared_experts") or 0) + h * experts  # + the router
    touched = experts * (1 - (1 - k / experts) ** batch)
    num_dense = cfg.get("first_k_dense_replace") or len(cfg.get("mlp_only_layers") or [])
    num_moe = layers - num_dense
    read = num_dense * dense + num_moe * (shared + touched * 3 * h * inter)
    used = num_dense * dense + num_moe * (shared + k * 3 * h * inter)
    return read, used


def w1_floor(cfg: dict, num_requests: int, prompt_len: int, output_len: int, wave: int, bw: float,
             flops: float) -> dict:
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    attn_params, kv_layer_bytes = _attention_params(cfg)
    kv_per_token = layers * kv_layer_bytes
    other_bytes = 2 * (layers * (attn_params + 2 * h) + h * vocab + h)  # + norms, LM head; embedding rows gathered
    _, mlp_used = _mlp_params(cfg, 1)
    per_token_params = layers * attn_params + mlp_used
    # Prefill: 2 FLOPs per parameter used per token (LM head only for the last token) + causal
    # attention: 2 FLOPs per multiply-add of Q.K^T and P.V over the causal half of the P x P scores.
    qk, pv = _attention_widths(cfg)
    prefill_flops = num_requests * (2 * per_token_params * prompt_len + 2 * h * vocab
                                    + layers * 2 * (qk + pv) * prompt_len * prompt_len / 2)
    decode_s = 0.0
    for start in range(0, num_requests, wave):
        batch = min(wave, num_requests - start)
        weight_bytes = other_bytes + 2 * _mlp_params(cfg, batch)[0]
        for k in range(1, output_len):  # the first token comes out of the prefill
            decode_s += (weight_bytes + batch * (prompt_len + k) * kv_per_token) / bw
    prefill_s = prefill_flops / flops
    return dict(prefill_flops=prefill_flops, prefill_s=prefill_s, decode_s=decode_s, floor_s=prefill_s + decode_s,
                wave=wave, weight_bytes=other_bytes + 2 * _mlp_params(cfg, wave)[0], kv_bytes_per_token=kv_per_token)


def braid_variant(engine: str) -> dict | None:
    """'braid', 'braid-async', 'braid-ms8', 'braid-async-ms16', 'braid-tp2-async', 'braid-pp2',
    'braid-pp2-inflight1' (one batch in the pipeline at a time), 'braid-pp2-eager',
    'braid-pp4-async-layers9_8_8_7' (--pp-layer-partition 9,8,8,7), 'braid-pp4-async-chunk2048'
    (--max-num-batched-tokens 2048; 8192 otherwise), ... -> engine options (None: not braid)."""
    parts = engine.split("-")
    if parts[0] != "braid":
        return None
    options = dict(async_scheduling=False, num_scheduler_steps=1, tensor_parallel_size=1, pipeline_parallel_size=1,
                   max_concurrent_batches=None, enforce_eager=False, data_parallel_size=1,
                   enable_expert_parallel=False, enable_dbo=False, pp_layer_partition=None,
                   max_num_batched_tokens=8192)
    for part in parts[1:]:
        if part == "async":
            options["async_scheduling"] = True
        elif part.startswith("ms") and part[2:].isdigit():
            options["num_scheduler_steps"] = int(part[2:])
        elif part.startswith("tp") and part[2:].isdigit():
            options["tensor_parallel_size"] = int(part[2:])
        elif part.startswith("pp") and part[2:].isdigit():
            options["pipeline_parallel_size"] = int(part[2:])
        elif part.startswith("inflight") and part[8:].isdigit():  # --max-concurrent-batches
            options["max_concurrent_batches"] = int(part[8:])
        elif part == "eager":
            options["enforce_eager"] = True
        elif part.startswith("dp") and part[2:].isdigit():
            options["data_parallel_size"] = int(part[2:])
        elif part == "ep":
            options["enable_expert_parallel"] = True
        elif part == "dbo":
            options["enable_dbo"] = True
        elif part.startswith("layers"):  # layers per pipeline stage, '_'-separated
            options["pp_layer_partition"] = part[6:].replace("_", ",")
        elif part.startswith("chunk") and part[5:].isdigit():  # tokens per batch (prefill chunk budget)
            options["max_num_batched_tokens"] = int(part[5:])
        else:
            raise ValueError(f"--engines: unknown braid variant {engine!r}")
    return options


def run_braid(model_dir: str, prompts, output_len: int, max_num_seqs: int, enforce_eager: bool,
              trace_dir: str | None = None, async_scheduling: bool = False, num_scheduler_steps: int = 1,
              tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
              max_concurrent_batches: int | None = None, data_parallel_size: int = 1,
              enable_expert_parallel: bool = False, enable_dbo: bool = False,
              pp_layer_partition: str | None = None, max_num_batched_tokens: int = 8192) -> dict:
    from braid import LLM, SamplingParams

    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False, enforce_eager=enforce_eager,
              trace_dir=trace_dir, async_scheduling=async_scheduling, num_scheduler_steps=num_scheduler_steps,
              tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
              max_concurrent_batches=max_concurrent_batches, data_parallel_size=data_parallel_size,
              enable_expert_parallel=enable_expert_parallel, enable_dbo=enable_dbo,
              pp_layer_partition=pp_layer_partition)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], params, use_tqdm=False)  # compile kernels
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    preemptions = llm.llm_engine.last_stats.num_preemptions
    llm_stats_wasted = llm.llm_engine.last_stats.num_wasted_tokens
    llm.llm_engine.engine_core.shutdown()  # flush the timeline, stop worker processes
    busy = None
    if trace_dir:
        from braid.observe.trace_summary import summarize

        busy = summarize(trace_dir)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return dict(elapsed_s=elapsed, output_tokens=out_tokens, requests_per_s=len(prompts) / elapsed,
                output_tokens_per_s=out_tokens / elapsed, preemptions=preemptions, enforce_eager=enforce_eager,
                async_scheduling=async_scheduling, num_scheduler_steps=num_scheduler_steps,
                tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                max_concurrent_batches=max_concurrent_batches, data_parallel_size=data_parallel_size,
                enable_expert_parallel=enable_expert_parallel, enable_dbo=enable_dbo, pp_layer_partition=pp_layer_partition, wasted_tokens=llm_stats_wasted,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, trace_summary=busy)


def run_hf(model_dir: str, prompts, output_len: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=prompts[:8], generation_config=gen)
    torch.cuda.synchronize()
    # A progress bar (stderr) shows HF's rate even when a time limit cuts the run short.
    progress = {"progress_bar": True} if "progress_bar" in inspect.signature(model.generate_batch).parameters else {}
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen, **progress)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(r.generated_tokens) for r in results.values())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return dict(elapsed_s=elapsed, output_tokens=out_tokens, requests_per_s=len(prompts) / elapsed,
                output_tokens_per_s=out_tokens / elapsed, completed=len(results))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engines", default="braid,hf",
                   help="comma-separated: hf, braid, or braid variants such as braid-async, braid-ms8, braid-async-ms8")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--trace-dir", default=None, help="trace braid's runs here (GPU busy fraction)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    shape = SHAPES[args.shape]
    bw, flops = measure_copy_bandwidth(), measure_matmul_rate()
    floor = w1_floor(shape, args.num_prompts, args.input_len, args.output_len, args.max_num_seqs, bw, flops)
    model_dir = write_shape(args.shape)
    prompts = make_prompts(args.num_prompts, args.input_len, shape["vocab_size"])
    result = dict(benchmark="w1_throughput", **run_info(), shape=args.shape, model_config=shape,
                  workload=dict(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len),
                  copy_bandwidth_Bps=bw, matmul_flops=flops, floor=floor, runs={})
    for engine in args.engines.split(","):
        runs = []
        for _ in range(args.repeats):
            try:
                trace = f"{args.trace_dir}/{engine}-run{len(runs)}" if args.trace_dir else None
                variant = braid_variant(engine)
                if variant is not None:
                    runs.append(run_braid(model_dir, prompts, args.output_len, args.max_num_seqs, trace_dir=trace,
                                          **variant))
                elif engine == "hf":
                    runs.append(run_hf(model_dir, prompts, args.output_len))
                else:
                    raise ValueError(f"--engines: unknown engine {engine!r}")
            except Exception as e:  # noqa: BLE001 - record the failure, keep the other engine's numbers
                runs.append(dict(error=f"{type(e).__name__}: {e}"))
            gc.collect()  # a failed run's engine must not hold the GPU's memory for the next
            torch.cuda.empty_cache()
            write_result(args.out, {**result, "runs": {**result["runs"], engine: runs}})
        result["runs"][engine] = runs
    write_result(args.out, result)
    print(f"floor {floor['floor_s']:.2f} s (prefill {floor['prefill_s']:.2f} + decode {floor['decode_s']:.2f}); "
          f"copy {bw / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s")
    for engine, runs in result["runs"].items():
        for r in runs:
            if "error" in r:
                print(f"{engine:>16}: ERROR {r['error'][:300]}")
            else:
                gpu = (r.get("trace_summary") or {}).get("gpu") or {}
                busy = gpu.get("busy_fraction")
                # Under TP/PP every rank's GPU: busy over the run (steady state, the middle 80%).
                ranks = [(g["busy_fraction"], g["steady_busy_fraction"]) for g in gpu.get("per_gpu", [])
                         if "worker" in g["gpu"]]
                print(f"{engine:>22}: {r['elapsed_s']:.2f} s, {r['requests_per_s']:.2f} req/s, "
                      f"{r['output_tokens_per_s']:.0f} out tok/s, x floor {r['elapsed_s'] / floor['floor_s']:.2f}"
                      + (f", GPU busy {busy:.1%}" if busy is not None else "")
                      + ("; per rank " + " ".join(f"{b:.0%}({s:.0%})" for b, s in ranks) if ranks else "")
                      + f"; preemptions {r.get('preemptions')}")


if __name__ == "__main__":
    main()
