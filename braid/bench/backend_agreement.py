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


def compare(model: str, dtype: str, new_tokens: int = 64) -> dict:
    """Triton vs torch reference in `dtype`; prompt logprobs also against float32 torch."""
    ref = _run(model, dtype, "torch", new_tokens)
    tri = _run(model, dtype, "triton", new_tokens)
    same = [a == b for a, b in zip(ref["tokens"], tri["tokens"])]
    # Compare sample logprobs only up to the first token where the greedy paths diverge.
    agree_ref, agree_tri = [], []
    for a, b, la, lb in zip(ref["tokens"], tri["tokens"], ref["sample_logprobs"], tri["sample_logprobs"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agree_ref.append(la[: n + 1])
        agree_tri.append(lb[: n + 1])
    p_max, p_mean = _max_abs(ref["prompt_logprobs"], tri["prompt_logprobs"])
    s_max, s_mean = _max_abs(agree_ref, agree_tri)
    return {
        "dtype": dtype,
        "num_prompts": len(PROMPTS),
        "new_tokens": new_tokens,
        "greedy_identical": same,
        "prompt_logprob_max_abs_diff": p_max,
        "prompt_logprob_mean_abs_diff": p_mean,
        "sample_logprob_max_abs_diff": s_max,
        "sample_logprob_mean_abs_diff": s_mean,
    }
