"""Shared by the overlap-mode tests: prompts, a batch of requests whose stops land mid-run,
and an exact comparison of two engines' outputs (tokens, text, finish reasons, logprobs)."""
import random

from braid import SamplingParams

WORDS = ("the cat sat on a mat while seven engineers argued about kernels caches and the price of "
         "coffee in paris before the storm rolled over the quiet harbour town").split()


def make_prompts(tokenizer, n, seed=0):
    rng = random.Random(seed)
    return [tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60)))) for _ in range(n)]


def run_outputs(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].logprobs,
             o.prompt_logprobs) for o in outs]


def mixed_params(reference_llm, prompts, max_tokens=24, seed=1):
    """Per prompt: random max_tokens, a stop id or a stop string taken from what the reference
    generates (so they land mid-run), logprobs with min_tokens, or prompt logprobs."""
    rng = random.Random(seed)
    free_run = run_outputs(reference_llm, prompts, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                  ignore_eos=True))
    params = []
    for i, (ids, text, *_rest) in enumerate(free_run):
        kind = i % 5
        if kind == 0:
            params.append(SamplingParams(temperature=0, max_tokens=rng.randint(1, max_tokens), ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens,
                                         stop_token_ids=[ids[rng.randint(1, max_tokens * 2 // 3)]]))
        elif kind == 2:
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens, stop=[text[len(text) // 2:][:3] or "x"]))
        elif kind == 3:
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=3, min_tokens=5,
                                         stop_token_ids=[ids[2]]))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens // 2, prompt_logprobs=2))
    return params


def assert_same_outputs(got, want, lp_tol=1e-4):
    assert len(got) == len(want)
    for (g_ids, g_text, g_fin, g_lps, g_plps), (w_ids, w_text, w_fin, w_lps, w_plps) in zip(got, want):
        assert (g_ids, g_text, g_fin) == (w_ids, w_text, w_fin)
        for g, w in ((g_lps, w_lps), (g_plps, w_plps)):
            assert (g is None) == (w is None)
            assert len(g or []) == len(w or [])
            for g_pos, w_pos in zip(g or [], w or []):
                if w_pos is None:
                    assert g_pos is None
                    continue
                assert g_pos.keys() == w_pos.keys()
                for t in w_pos:
                    assert abs(g_pos[t].logprob - w_pos[t].logprob) < lp_tol
