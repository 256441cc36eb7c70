"""--async-scheduling (step t+1 scheduled and launched before step t's tokens reach the host)
gives exactly what synchronous stepping gives: greedy tokens, text, finish reasons and
logprobs, with stop ids/strings and max_tokens landing mid-run, chunked prefill, prefix
hits, preemption, aborts, penalties and seeded sampling. The KV pool is full afterwards."""
import pytest

from braid import LLM, SamplingParams
from braid.engine.arg_utils import EngineArgs
from braid.engine.llm_engine import LLMEngine
from tests.engine.conftest import assert_pool_full
from tests.engine.equivalence import assert_same_outputs, make_prompts, mixed_params
from tests.engine.equivalence import run_outputs as _run

@pytest.fixture(scope="module")
def pair(smollm2_path):
    kw = dict(max_model_len=512, kv_cache_memory="128MiB")
    return LLM(smollm2_path, **kw), LLM(smollm2_path, async_scheduling=True, **kw)


@pytest.fixture(scope="module")
def prompts(pair):
    return make_prompts(pair[0].get_tokenizer(), 32)


def test_mixed_batch_with_stops_landing_mid_run(pair, prompts):
    sync, asy = pair
    params = mixed_params(sync, prompts)
    want = _run(sync, prompts, params)
    got = _run(asy, prompts, params)
    assert_same_outputs(got, want)
    finish = [w[2] for w in want]
    assert finish.count("stop") >= 8 and finish.count("length") >= 8  # the stops did land mid-run
    assert_pool_full(asy)


def test_prefix_hits(pair, prompts):
    sync, asy = pair
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    shared = [prompts[0] + p for p in prompts[1:9]]  # one long shared prefix
    want = _run(sync, shared, params)
    _run(asy, shared[:2], params)
    outs = asy.generate([{"prompt_token_ids": p} for p in shared], params, use_tqdm=False)
    assert sum(o.num_cached_tokens for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == [w[0] for w in want]
    assert_pool_full(asy)


def test_chunked_prefill_and_preemption(smollm2_path, pair, prompts):
    sync = pair[0]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = _run(sync, prompts[:16], params)
    # A 7-token budget chunks every prompt; 12 blocks cannot hold 16 growing requests.
    tight = LLM(smollm2_path, max_model_len=160, num_gpu_blocks_override=12, max_num_seqs=16,
                max_num_batched_tokens=7, async_scheduling=True, enable_prefix_caching=False)
    got = _run(tight, prompts[:16], params)
    assert tight.llm_engine.last_stats.num_preemptions > 0
    assert [g[0] for g in got] == [w[0] for w in want]
    assert_pool_full(tight)


def test_penalties_and_seeded_sampling(pair, prompts):
    sync, asy = pair
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=7 + i, max_tokens=16, ignore_eos=True,
                             repetition_penalty=1.3 if i % 3 == 0 else 1.0,
                             frequency_penalty=0.5 if i % 3 == 1 else 0.0) for i in range(12)]
    want = _run(sync, prompts[:12], params)
    got = _run(asy, prompts[:12], params)
    assert [g[0] for g in got] == [w[0] for w in want]
    # Seeded sampling without penalties keeps two batches in flight and still reproduces.
    plain = [SamplingParams(temperature=0.8, seed=3 + i, max_tokens=16, ignore_eos=True) for i in range(12)]
    assert [g[0] for g in _run(asy, prompts[:12], plain)] == [w[0] for w in _run(sync, prompts[:12], plain)]
    assert_pool_full(asy)


def test_aborts_mid_run_and_id_reuse(smollm2_path, prompts):
    engine = LLMEngine.from_engine_args(EngineArgs(model=smollm2_path, max_model_len=512, kv_cache_memory="128MiB",
                                                   async_scheduling=True))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(prompts[:8]):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == 6:
            # Abort while a batch holding them is in flight, then reuse one id at once.
            engine.abort_request(["r1", "r2", "r3"])
            engine.add_request("r1", {"prompt_token_ids": prompts[9]}, params)
    sync = LLM(smollm2_path, max_model_len=512, kv_cache_memory="128MiB")
    want = [o.outputs[0].token_ids for o in sync.generate(
        [{"prompt_token_ids": p} for p in [prompts[0], prompts[9]] + prompts[4:8]], params, use_tqdm=False)]
    assert sorted(done) == ["r0", "r1", "r4", "r5", "r6", "r7"]
    assert [done[k] for k in ["r0", "r1", "r4", "r5", "r6", "r7"]] == want  # no stale token reached the new r1
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks
    while engine.engine_core.has_unfinished_requests():  # drain the batch still in flight
        engine.step()
    assert not engine.engine_core.scheduler._stale_in_flight
