"""How closely the Triton attention backend agrees with the torch reference on a real model:
greedy tokens, and prompt/sample logprobs, per dtype."""
from __future__ import annotations

import gc

import torch

from braid.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 5, 8, 13,",
    "Translate to French: I would like a cup of coffee, please.",
    "The three primary colors are",
    "Explain why the sky is blue in one paragraph. " * 8,
    "List the planets of the solar system in order from the sun: " * 3,
]


def _run(model: str, dtype: str, backend: str, new_tokens: int) -> dict:
    from braid import LLM

    llm = LLM(model, dtype=dtype, attention_backend=backend, kv_cache_memory="2GiB", max_model_len=2048,
              enable_prefix_caching=False)
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    outs = llm.generate(PROMPTS, greedy, use_tqdm=False)
    result = {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "sample_logprobs": [[d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                            for o in outs],
        "prompt_logprobs": [[d[t].logprob for t, d in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
                            for o in outs],
    }
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _max_abs(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    x = torch.tensor([v for row in a for v in row], dtype=torch.float64)
    y = torch.tensor([v for row in b for v in row], dtype=torch.float64)
    d = (x - y).abs()
    return float(d.max()), float(d.mean())


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def _sample_diff(x: dict, y: dict) -> tuple[float, float]:
    """Sample logprob differences up to and including the first token where the greedy paths part."""
    xs, ys = [], []
    for a, b, la, lb in zip(x["tokens"], y["tokens"], x["sample_logprobs"], y["sample_logprobs"]):
        n = _first_divergence(a, b)
        xs.append(la[: n + 1])
        ys.append(lb[: n + 1])
    return _max_abs(xs, ys)


def _diffs(x: dict, y: dict) -> dict:
    p_max, p_mean = _max_abs(x["prompt_logprobs"], y["prompt_logprobs"])
    s_max, s_mean = _sample_diff(x, y)
    return {
        "greedy_identical": [a == b for a, b in zip(x["tokens"], y["tokens"])],
        "first_divergence": [_first_divergence(a, b) for a, b in zip(x["tokens"], y["tokens"])],
        "prompt_logprob_max_abs_diff": p_max,
        "prompt_logprob_mean_abs_diff": p_mean,
        "sample_logprob_max_abs_diff": s_max,
        "sample_logprob_mean_abs_diff": s_mean,
    }


def compare(model: str, dtype: str, new_tokens: int = 64) -> dict:
    """Triton vs torch reference in `dtype`. For reduced precision, also each backend's
    distance from the float32 torch reference: Triton should be no further than the
    reference backend run in the same dtype."""
    ref = _run(model, dtype, "torch", new_tokens)
    tri = _run(model, dtype, "triton", new_tokens)
    result = {"dtype": dtype, "num_prompts": len(PROMPTS), "new_tokens": new_tokens, **_diffs(ref, tri)}
    if dtype != "float32":
        exact = _run(model, "float32", "torch", new_tokens)
        result["torch_vs_float32"] = _diffs(exact, ref)
        result["triton_vs_float32"] = _diffs(exact, tri)
    return result
