"""--num-scheduler-steps N: decode-only batches run N forward passes per schedule, fed from
the device. For N in {1, 2, 8, 16}, with and without async scheduling, outputs equal plain
single-step decoding exactly (tokens, text, finish reasons, logprobs), with EOS, stop ids,
stop strings and max_tokens landing mid-run, requests arriving and aborted mid-run, and
preemption; the KV pool is full afterwards. Streamed, every pass reports its own token."""
import time

import pytest

from braid import LLM, SamplingParams
from braid.engine.arg_utils import EngineArgs
from braid.engine.llm_engine import LLMEngine
from tests.engine.conftest import assert_pool_full
from tests.engine.equivalence import assert_same_outputs, make_prompts, mixed_params, run_outputs

KW = dict(max_model_len=512, kv_cache_memory="128MiB")


@pytest.fixture(scope="module")
def plain(smollm2_path):
    return LLM(smollm2_path, **KW)


@pytest.fixture(scope="module")
def prompts(plain):
    return make_prompts(plain.get_tokenizer(), 16)


@pytest.fixture(scope="module")
def mixed(plain, prompts):
    params = mixed_params(plain, prompts, max_tokens=40)
    return params, run_outputs(plain, prompts, params)


def _count_passes(llm):
    """Wrap the scheduler so the test sees how many passes each scheduled batch ran."""
    scheduler = llm.llm_engine.engine_core.scheduler
    seen = []
    schedule = scheduler.schedule

    def recording():
        out = schedule()
        seen.append(out.num_steps)
        return out

    scheduler.schedule = recording
    return seen


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("steps", [1, 2, 8, 16])
def test_same_outputs_as_single_steps(smollm2_path, prompts, mixed, steps, async_scheduling):
    params, want = mixed
    llm = LLM(smollm2_path, num_scheduler_steps=steps, async_scheduling=async_scheduling, **KW)
    passes = _count_passes(llm)
    got = run_outputs(llm, prompts, params)
    assert_same_outputs(got, want)
    finish = [w[2] for w in want]
    assert finish.count("stop") >= 4 and finish.count("length") >= 4  # stops did land inside runs
    assert max(passes) == steps  # multi-step batches really ran (decode-only, nothing waiting)
    assert_pool_full(llm)
    if steps > 1:  # requests that stopped mid-run wasted the rest of it, and that is counted
        assert llm.llm_engine.last_stats.num_wasted_tokens > 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_arrivals_and_aborts_mid_run(smollm2_path, plain, prompts, async_scheduling):
    engine = LLMEngine.from_engine_args(EngineArgs(model=smollm2_path, num_scheduler_steps=8,
                                                   async_scheduling=async_scheduling, **KW))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, params)
    done, calls = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        calls += 1
        if calls == 12:  # inside a multi-step run: two arrive, one is aborted
            engine.add_request("late0", {"prompt_token_ids": prompts[4]}, params)
            engine.add_request("late1", {"prompt_token_ids": prompts[5]}, params)
            engine.abort_request(["r1"])
    want = run_outputs(plain, [prompts[i] for i in (0, 2, 3, 4, 5)], params)
    assert [done[k] for k in ("r0", "r2", "r3", "late0", "late1")] == [w[0] for w in want]
    assert "r1" not in done
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


def test_preemption(smollm2_path, plain, prompts):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = run_outputs(plain, prompts, params)
    tight = LLM(smollm2_path, max_model_len=160, num_gpu_blocks_override=14, max_num_seqs=16,
                num_scheduler_steps=8, async_scheduling=True, enable_prefix_caching=False)
    passes = _count_passes(tight)
    got = run_outputs(tight, prompts, params)
    assert tight.llm_engine.last_stats.num_preemptions > 0
    assert max(passes) > 1
    assert [g[0] for g in got] == [w[0] for w in want]
    assert_pool_full(tight)


def test_penalties_and_seeds_fall_back_to_single_steps(smollm2_path, plain, prompts):
    params = [SamplingParams(temperature=0.8, seed=11 + i, max_tokens=16, ignore_eos=True,
                             presence_penalty=0.5 if i % 2 else 0.0) for i in range(8)]
    llm = LLM(smollm2_path, num_scheduler_steps=8, async_scheduling=True, **KW)
    passes = _count_passes(llm)
    assert [g[0] for g in run_outputs(llm, prompts[:8], params)] == \
        [w[0] for w in run_outputs(plain, prompts[:8], params)]
    assert max(passes) == 1  # penalties read every generated id: plain steps
    seeded = [SamplingParams(temperature=0.8, seed=11 + i, max_tokens=16, ignore_eos=True) for i in range(8)]
    assert [g[0] for g in run_outputs(llm, prompts[:8], seeded)] == \
        [w[0] for w in run_outputs(plain, prompts[:8], seeded)]
    assert max(passes) == 8


@pytest.mark.parametrize("stream", [True, False])
def test_tokens_stream_one_per_pass(smollm2_path, prompts, stream):
    """Arrival times of each request's tokens: streamed, every token arrives on its own (one
    per pass, never a burst of N); not streamed, the N tokens of a run arrive together."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=smollm2_path, num_scheduler_steps=8,
                                                   multi_step_stream_outputs=stream, **KW))
    params = SamplingParams(temperature=0, max_tokens=33, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i]}, params)
    arrivals: dict[str, list[float]] = {f"r{i}": [] for i in range(4)}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:  # outputs are cumulative: the new tokens are the ones past what arrived
            times = arrivals[out.request_id]
            times += [now] * (len(out.outputs[0].token_ids) - len(times))
    for times in arrivals.values():
        assert len(times) == 33
        gaps = [b - a for a, b in zip(times, times[1:])]
        together = sum(g == 0 for g in gaps)
        if stream:
            assert together == 0  # each token in its own report
        else:
            assert together >= 3 * 7  # after the prefill token: 32 tokens in 4 runs of 8


def test_bad_flag_value():
    with pytest.raises(ValueError, match="--num-scheduler-steps"):
        EngineArgs(num_scheduler_steps=0).create_engine_config()
