"""A request gets the same greedy tokens whatever the batch around it: alone, in a
batch of 32 mixed-length requests, under chunked prefill with a tiny token budget,
after a prefix-cache hit, and after being preempted and recomputed."""
import random

import pytest

from braid import LLM, SamplingParams
from tests.engine.conftest import assert_pool_full

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _make_prompts(tokenizer, n=32, seed=0):
    rng = random.Random(seed)
    words = ("the cat sat on a mat while seven engineers argued about kernels caches and the price of "
             "coffee in paris before the storm rolled over the quiet harbour town").split()
    prompts = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 60)))
        prompts.append(tokenizer.encode(text))
    return prompts


@pytest.fixture(scope="module")
def base(smollm2_path):
    return LLM(smollm2_path, max_model_len=512, kv_cache_memory="128MiB")


@pytest.fixture(scope="module")
def prompts(base):
    return _make_prompts(base.get_tokenizer())


@pytest.fixture(scope="module")
def alone(base, prompts):
    """Each probe request run on its own, with prefix caching off so nothing is shared."""
    probes = prompts[:4]
    llm = LLM(base.engine_args.model, max_model_len=512, kv_cache_memory="128MiB", enable_prefix_caching=False)
    return [llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in probes]


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                          use_tqdm=False)]


def test_inside_a_batch_of_32(base, prompts, alone):
    got = _tokens(base, prompts)
    assert got[:4] == alone
    assert_pool_full(base)


def test_after_prefix_cache_hit(base, prompts, alone):
    _tokens(base, prompts[:4])  # warm the cache
    outs = base.generate([{"prompt_token_ids": p} for p in prompts[:4]], GREEDY, use_tqdm=False)
    assert any(o.num_cached_tokens > 0 for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert_pool_full(base)


def test_chunked_prefill_small_budget(smollm2_path, prompts, alone):
    llm = LLM(smollm2_path, max_model_len=512, kv_cache_memory="128MiB", max_num_batched_tokens=7,
              enable_prefix_caching=False)
    assert _tokens(llm, prompts[:8])[:4] == alone
    assert_pool_full(llm)


def test_preempted_and_recomputed(smollm2_path, prompts, alone):
    # 20 blocks of 16 tokens cannot hold 16 growing requests: the newest get preempted.
    llm = LLM(smollm2_path, max_model_len=160, num_gpu_blocks_override=20, max_num_seqs=16)
    got = _tokens(llm, prompts[:16])
    assert llm.llm_engine.last_stats.num_preemptions > 0
    assert got[:4] == alone
    assert_pool_full(llm)


def test_seeded_sampling_survives_preemption(smollm2_path, base, prompts):
    """A preempted request keeps its seeded generator, so its samples match an unpreempted run."""
    seeded = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=NEW_TOKENS, ignore_eos=True)
              for i in range(16)]
    reqs = [{"prompt_token_ids": p} for p in prompts[:16]]
    calm = [o.outputs[0].token_ids for o in base.generate(reqs, seeded, use_tqdm=False)]
    tight = LLM(smollm2_path, max_model_len=160, num_gpu_blocks_override=20, max_num_seqs=16)
    squeezed = [o.outputs[0].token_ids for o in tight.generate(reqs, seeded, use_tqdm=False)]
    assert tight.llm_engine.last_stats.num_preemptions > 0
    assert squeezed == calm
    assert_pool_full(tight)
