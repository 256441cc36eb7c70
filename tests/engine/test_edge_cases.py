"""Edge cases found in review: each once broke results, hung a request, or wedged the engine."""
import pytest

from braid import LLM, SamplingParams
from braid.config import SchedulerConfig
from braid.core.scheduler import Scheduler
from braid.core.kv_cache_manager import KVCacheManager
from tests.core.helpers import make_request
from tests.core.test_scheduler import fake_run
from tests.engine.conftest import assert_pool_full
from tests.tiny_checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"))


def test_prompt_logprobs_reported_once_after_preemption(tiny):
    prompts = [[5 + i, 17, 33, 8, 90, 91, 92, 14, 200] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    tight = LLM(tiny, max_model_len=64, num_gpu_blocks_override=16, block_size=4, max_num_seqs=6)
    outs = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.llm_engine.last_stats.num_preemptions > 0
    calm = LLM(tiny, max_model_len=64, kv_cache_memory="8MiB", block_size=4)
    ref = calm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for o, r in zip(outs, ref):
        assert len(o.prompt_logprobs) == len(o.prompt_token_ids) == 9
        assert [d and sorted(d) for d in o.prompt_logprobs] == [d and sorted(d) for d in r.prompt_logprobs]
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
    assert_pool_full(tight)


def test_sample_ids_cannot_collide_with_user_ids(tiny):
    llm = LLM(tiny, max_model_len=64, kv_cache_memory="8MiB")
    engine = llm.llm_engine
    engine.add_request("0_x", "Hello", SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", "Hello", SamplingParams(n=2, max_tokens=3, ignore_eos=True))
    assert "x" not in engine.output_processor.requests
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert list(done) == ["0_x"] and len(done["0_x"].outputs[0].token_ids) == 3
    assert_pool_full(llm)


@pytest.mark.parametrize("prompt, params, field", [
    ({"prompt_token_ids": [1.5, 7, 9]}, SamplingParams(), "integers"),
    ({"prompt_token_ids": [True, 7]}, SamplingParams(), "integers"),
    ([3, 4.0], SamplingParams(), "integers"),
    ("Hello", SamplingParams(prompt_logprobs=10**6), "prompt_logprobs"),
    ("Hello", SamplingParams(logprobs=10**6), "logprobs"),
])
def test_inputs_that_would_crash_a_step_are_refused(tiny, prompt, params, field):
    llm = LLM(tiny, max_model_len=64, kv_cache_memory="8MiB")
    with pytest.raises(ValueError, match=field):
        llm.generate(prompt, params, use_tqdm=False)
    assert llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
    assert_pool_full(llm)


@pytest.mark.parametrize("kwargs, field", [
    (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(repetition_penalty=float("inf")), "repetition_penalty"),
])
def test_non_finite_and_oversized_sampling_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_extreme_seed_with_n_samples_stays_in_range(tiny):
    llm = LLM(tiny, max_model_len=64, kv_cache_memory="8MiB")
    out = llm.generate("Hello", SamplingParams(n=3, seed=2**63 - 1, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs) == 3


def test_prefix_cache_lookups_counted_once_per_request():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=4, max_model_len=64),
                  KVCacheManager(32, 4, enable_caching=True))
    for i in range(2):
        s.add_request(make_request(str(i), list(range(20)), max_tokens=1))
    while s.has_unfinished_requests():
        out = s.schedule()
        s.update_from_output(out, fake_run(out, {r: s.requests[r] for r in out.num_scheduled_tokens}))
    assert s.kv.stats.queries == 40
