"""Where a decode step's time goes, Llama-3-8B shape on one GPU.

Three parts, each against its floor from the measured ceilings:
  gemm       torch linear for every weight matrix of a layer (and the LM head) at several batch sizes;
  attention  the Triton decode attention kernels alone over a context-512 paged cache, per launch config;
  engine     full engine decode steps under torch.profiler: GPU kernel time per step by kernel,
             and the step's wall time (the difference is GPU idle time);
  prefill    W1's prefill steps (16 prompts x 512 tokens), alone and next to 256 decoding requests,
             under torch.profiler: GPU time by kernel kind against the step's FLOP floor.

    python benchmarks/profile_decode.py --parts gemm,attention,engine --out result.json
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn.functional as F

from braid.bench.floors import _median_ms, graph_median_ms, measure_copy_bandwidth, measure_matmul_rate
from braid.bench.run_info import run_info, write_result
from braid.bench.shapes import SHAPES, write_shape

LLAMA_MATRICES = {  # name: (in_features, out_features) for Llama-3-8B
    "qkv": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
    "lm_head": (4096, 128256),
}


def bench_gemm(batches, bw, flops) -> list[dict]:
    rows = []
    for name, (k, n) in LLAMA_MATRICES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        for m in batches:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ms = _median_ms(lambda: F.linear(x, w), iters=50)
            floor = max(w.numel() * 2 / bw, 2 * m * n * k / flops) * 1e3
            rows.append(dict(matrix=name, m=m, k=k, n=n, ms=ms, floor_ms=floor, ratio=ms / floor))
        del w
    torch.cuda.empty_cache()
    return rows


def bench_attention(batches, context, bw) -> list[dict]:
    from braid.layers.attention.triton_decode_attention import split_kv_decode_attention
    from braid.layers.attention.triton_unified_attention import unified_attention

    heads, kv_heads, d, block = 32, 8, 128, 16
    rows = []
    for b in batches:
        blocks_per_req = -(-context // block)
        num_blocks = b * blocks_per_req + 1
        cache = torch.randn(2, num_blocks, block, kv_heads, d, dtype=torch.bfloat16, device="cuda")
        perm = torch.randperm(num_blocks - 1, device="cuda")[: b * blocks_per_req].int() + 1
        table = perm.view(b, blocks_per_req)
        q = torch.randn(b, heads, d, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        seq_lens = torch.full((b,), context, dtype=torch.int32, device="cuda")
        kv_bytes = b * context * kv_heads * d * 2 * 2
        floor = kv_bytes / bw * 1e3
        configs = [("unified", dict(tile_n=t, num_warps=w, num_stages=s))
                   for t in (16, 32, 64) for w in (2, 4, 8) for s in (1, 3)]
        configs += [(f"split{n}", dict(num_splits=n, tile_n=t, num_warps=w))
                    for n in (2, 4, 8) for t in (32, 64) for w in (4, 8)]
        for kind, cfg in configs:
            if kind == "unified":
                fn = lambda: unified_attention(out, q, cache, qsl, seq_lens, table, 1, 0.088, **cfg)  # noqa: E731
            else:
                fn = lambda: split_kv_decode_attention(out, q, cache, qsl, seq_lens, table, scale=0.088, **cfg)  # noqa: E731
            try:  # 8 launches per graph: one launch alone is too short to time well
                ms = graph_median_ms(lambda: [fn() for _ in range(8)], calls=8)
            except Exception as e:  # a config Triton cannot compile (shared memory) is skipped
                rows.append(dict(batch=b, kernel=kind, **cfg, error=str(e)[:200]))
                continue
            rows.append(dict(batch=b, kernel=kind, **cfg, ms=ms, floor_ms=floor, ratio=ms / floor))
        del cache
        torch.cuda.empty_cache()
    return rows


def profile_engine(batches, context, steps, enforce_eager) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    from braid.engine.arg_utils import EngineArgs
    from braid.engine.core import EngineCore
    from braid.engine.messages import EngineCoreRequest
    from braid.sampling_params import SamplingParams

    args = EngineArgs(model=write_shape("llama3-8b"), load_format="dummy", dtype="bfloat16",
                      max_model_len=context + steps + 64, max_num_seqs=max(batches), max_num_batched_tokens=8192,
                      enable_prefix_caching=False, enforce_eager=enforce_eager)
    core = EngineCore(args.create_engine_config())
    vocab = SHAPES["llama3-8b"]["vocab_size"]
    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        ids = [f"p{b}-{i}" for i in range(b)]
        for rid in ids:
            prompt = torch.randint(0, vocab, (context,), generator=g).tolist()
            core.add_request(EngineCoreRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=steps + 16,
                                                                           ignore_eos=True)))
        started: set[str] = set()
        while len(started) < b:
            started.update(o.request_id for o in core.step().outputs)
        for _ in range(3):
            core.step()
        torch.cuda.synchronize()
        walls = []
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                t0 = time.perf_counter()
                core.step()
                torch.cuda.synchronize()
                walls.append((time.perf_counter() - t0) * 1e3)
        kernels = collections.defaultdict(lambda: [0.0, 0])
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                k = kernels[ev.name[:90]]
                k[0] += ev.time_range.elapsed_us() / 1e3 / steps
                k[1] += 1
        gpu_ms = sum(v[0] for v in kernels.values())
        ordered = sorted((ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
                         key=lambda ev: ev.time_range.start)
        first_kernels = [dict(name=ev.name[:60], us=ev.time_range.elapsed_us()) for ev in ordered[:24]]
        top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
        rows.append(dict(batch=b, enforce_eager=enforce_eager, wall_ms_median=statistics.median(walls),
                         gpu_kernel_ms_per_step=gpu_ms, kernels_per_step=sum(v[1] for v in kernels.values()) / steps,
                         first_kernels=first_kernels,
                         top_kernels=[dict(name=n, ms_per_step=v[0], launches_per_step=v[1] / steps)
                                      for n, v in top]))
        core.abort_requests(ids)
    return rows


KERNEL_KINDS = (("gemm", ("gemm", "xmma", "nvjet", "cutlass", "cublas")), ("attention", ("attention",)),
                ("norm", ("rms", "norm")), ("silu", ("silu",)), ("rotary", ("rotary", "rope")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def prefill_floor_ms(cfg: dict, prompts: int, length: int, flops_rate: float, decoding: int = 0) -> tuple[float, float]:
    """(FLOP floor in ms, FLOPs) of a step prefilling `prompts` prompts of `length` tokens:
    every linear per token, causal attention per prompt, the LM head for the last tokens; plus
    `decoding` decode tokens' linears and LM head (their KV reads, memory-bound, not counted)."""
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads
    linear = layers * (h * (heads + 2 * kv_heads) * d + heads * d * h + 3 * h * inter)
    attention = layers * 4 * heads * d * (length * (length + 1) // 2)  # QK^T and PV over the causal half
    flops = prompts * (2 * linear * length + attention) + 2 * (prompts + decoding) * h * cfg["vocab_size"]
    flops += 2 * decoding * linear
    return flops / flops_rate * 1e3, flops


def profile_prefills(prompts_per_step: int, length: int, steps: int, decodings: list[int], flops_rate: float) -> list[dict]:
    """`profile_prefill` for each number of decoding requests, on one engine (a second engine would
    not fit next to the first one's KV pool)."""
    from braid.engine.arg_utils import EngineArgs
    from braid.engine.core import EngineCore

    args = EngineArgs(model=write_shape("llama3-8b"), load_format="dummy", dtype="bfloat16", max_model_len=2048,
                      max_num_seqs=max(decodings) + prompts_per_step, max_num_batched_tokens=prompts_per_step * length,
                      enable_prefix_caching=False)
    core = EngineCore(args.create_engine_config())
    return [profile_prefill(core, prompts_per_step, length, steps, d, flops_rate) for d in decodings]


def profile_prefill(core, prompts_per_step: int, length: int, steps: int, decoding: int, flops_rate: float) -> dict:
    """W1's prefill steps under torch.profiler: `steps` steps of `prompts_per_step` fresh prompts of
    `length` tokens (8192 tokens at 16 x 512), alone (decoding=0) or next to `decoding` requests that
    decode (W1's mixed steps: the chunk budget left after the decodes). GPU time by kernel kind
    against the step's FLOP floor."""
    from torch.profiler import ProfilerActivity, profile

    from braid.engine.messages import EngineCoreRequest
    from braid.sampling_params import SamplingParams

    cfg = SHAPES["llama3-8b"]
    g = torch.Generator().manual_seed(7 + decoding)
    added: list[str] = []

    def add(prefix: str, n: int, max_tokens: int) -> list[str]:
        ids = [f"{decoding}-{prefix}-{i}" for i in range(n)]
        added.extend(ids)
        for rid in ids:
            core.add_request(EngineCoreRequest(rid, torch.randint(0, cfg["vocab_size"], (length,), generator=g).tolist(),
                                               SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)))
        return ids

    if decoding:
        add("decode", decoding, 10_000)
    while decoding and core.kv_cache_manager.num_free_blocks and len(core.step().outputs) < decoding:
        pass  # until every decoding request has its first token
    for w in range(2):  # warm: the prefill shapes compiled, the decoders in steady state
        add(f"warm{w}", prompts_per_step, 1)
        core.step()
    torch.cuda.synchronize()
    walls, kinds, tokens = [], collections.Counter(), []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            add(f"p{i}", prompts_per_step, 1)
            t0 = time.perf_counter()
            core.step()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
    by_kernel = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kinds[kernel_kind(ev.name)] += ev.time_range.elapsed_us() / 1e3 / steps
            by_kernel[ev.name[:90]] += ev.time_range.elapsed_us() / 1e3 / steps
    floor, flops = prefill_floor_ms(cfg, prompts_per_step, length, flops_rate, decoding)
    core.abort_requests(added)  # the decoders, and any prompt a mixed step left half done
    while core.has_unfinished_requests():
        core.step()
    return dict(prompts_per_step=prompts_per_step, length=length, decoding=decoding, steps=steps,
                wall_ms=walls, wall_ms_median=statistics.median(walls), gpu_ms_by_kind=dict(kinds),
                gpu_ms=sum(kinds.values()), flop_floor_ms=floor, flops=flops,
                top_kernels=[dict(name=n, ms_per_step=v) for n, v in by_kernel.most_common(16)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="gemm,attention,engine")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    parts = a.parts.split(",")
    batches = [int(x) for x in a.batches.split(",")]
    bw, flops = measure_copy_bandwidth(), measure_matmul_rate()
    result = dict(benchmark="profile_decode", **run_info(), copy_bandwidth_Bps=bw, matmul_flops=flops,
                  context=a.context)
    print(f"copy {bw / 1e12:.2f} TB/s  matmul {flops / 1e12:.0f} TFLOP/s")
    if "gemm" in parts:
        result["gemm"] = bench_gemm(batches, bw, flops)
        for r in result["gemm"]:
            print(f"gemm {r['matrix']:>8} m={r['m']:<4} {r['ms']:.3f} ms  floor {r['floor_ms']:.3f}  x{r['ratio']:.2f}")
    if "attention" in parts:
        result["attention"] = bench_attention(batches, a.context, bw)
        ok = [r for r in result["attention"] if "ms" in r]
        for b in sorted({r["batch"] for r in ok}):
            best = sorted((r for r in ok if r["batch"] == b), key=lambda r: r["ms"])
            default = next(r for r in ok if r["batch"] == b and r["kernel"] == "unified" and r["tile_n"] == 32
                           and r["num_warps"] == 4 and r["num_stages"] == 3)
            print(f"attn b={b} floor {best[0]['floor_ms']:.3f} ms  default {default['ms']:.3f}  best:")
            for r in best[:4]:
                print(f"   {r['kernel']} {({k: v for k, v in r.items() if k in ('tile_n', 'num_warps', 'num_stages', 'num_splits')})} "
                      f"{r['ms']:.3f} ms x{r['ratio']:.2f}")
    if "prefill" in parts:
        result["prefill"] = profile_prefills(16, 512, a.steps, [0, 256], flops)
        for r in result["prefill"]:
            print(f"prefill 16 x 512 + {r['decoding']} decoding: wall {r['wall_ms_median']:.1f} ms, gpu {r['gpu_ms']:.1f} "
                  f"ms, FLOP floor {r['flop_floor_ms']:.1f} ms (x{r['wall_ms_median'] / r['flop_floor_ms']:.2f}); "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["gpu_ms_by_kind"].items(), key=lambda kv: -kv[1])))
            for k in r["top_kernels"][:10]:
                print(f"   {k['ms_per_step']:7.2f} ms  {k['name'][:80]}")
    if "engine" in parts:
        result["engine"] = profile_engine(batches, a.context, a.steps, a.enforce_eager)
        for r in result["engine"]:
            print(f"engine b={r['batch']} eager={r['enforce_eager']} wall {r['wall_ms_median']:.2f} ms  "
                  f"gpu kernels {r['gpu_kernel_ms_per_step']:.2f} ms/step, {r['kernels_per_step']:.0f} kernels/step")
            for k in r["top_kernels"][:16]:
                print(f"   {k['ms_per_step']:7.3f} ms  x{k['launches_per_step']:<5.0f} {k['name'][:70]}")
            print("   first kernels of a step: " + ", ".join(f"{k['name'][:22]} {k['us']:.1f}" for k in r["first_kernels"]))
    write_result(a.out, result)


if __name__ == "__main__":
    main()
