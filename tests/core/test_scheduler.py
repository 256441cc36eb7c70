"""The scheduler against a fake model that always samples token 7 (or a scripted id)."""
from braid.config import SchedulerConfig
from braid.core.kv_cache_manager import KVCacheManager
from braid.core.request import RequestStatus
from braid.core.scheduler import Scheduler
from braid.core.scheduler_output import ModelRunnerOutput
from tests.core.helpers import make_request


def make_scheduler(num_blocks=64, block_size=4, **cfg):
    cfg.setdefault("max_model_len", 64)
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(num_blocks, block_size, enable_caching=True))


def fake_run(sched_out, requests, token=7):
    """Sample `token` for every request whose known tokens are all computed after this step."""
    ids = list(sched_out.num_scheduled_tokens)
    sampled = []
    for req_id in ids:
        r = requests[req_id]
        sampled.append([token] if r.num_computed_tokens >= r.num_tokens else [])
    return ModelRunnerOutput(req_ids=ids, sampled_token_ids=sampled, logprobs=[None] * len(ids))


def run_to_end(s, reqs, max_steps=500, token=7):
    finished, steps = {}, []
    by_id = {r.request_id: r for r in reqs}
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        steps.append(out)
        for o in s.update_from_output(out, fake_run(out, by_id, token)).outputs:
            if o.finished:
                finished[o.request_id] = o.finish_reason
    return finished, steps


def test_token_budget_chunks_long_prompts_and_mixes_decodes():
    s = make_scheduler(max_num_batched_tokens=8)
    a = make_request("a", list(range(20)), max_tokens=3)
    s.add_request(a)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 8}
    assert a.num_computed_tokens == 8
    s.update_from_output(out, fake_run(out, {"a": a}))
    assert a.num_output_tokens == 0  # partial prefill samples nothing
    b = make_request("b", [1, 2, 3], max_tokens=3)
    s.add_request(b)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 8}  # budget spent on the running request first
    s.update_from_output(out, fake_run(out, {"a": a, "b": b}))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 4, "b": 3}
    s.update_from_output(out, fake_run(out, {"a": a, "b": b}))
    finished, _ = run_to_end(s, [a, b])
    assert a.output_token_ids == [7, 7, 7] and b.num_output_tokens == 3
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_max_num_seqs_limits_running_requests():
    s = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    reqs = [make_request(str(i), [1, 2, 3], max_tokens=2) for i in range(5)]
    for r in reqs:
        s.add_request(r)
    finished, steps = run_to_end(s, reqs)
    assert list(steps[0].num_scheduled_tokens) == ["0", "1"]
    assert all(len(st.num_scheduled_tokens) <= 2 for st in steps)
    assert set(finished) == {"0", "1", "2", "3", "4"}
    assert all(r.num_output_tokens == 2 for r in reqs)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_fcfs_order_of_admission():
    s = make_scheduler(max_num_batched_tokens=4)
    reqs = [make_request(str(i), [1, 2, 3, 4], max_tokens=1) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    order = []
    for _ in range(10):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        order.extend(r.req_id for r in out.scheduled_new_reqs)
        s.update_from_output(out, fake_run(out, {r.request_id: r for r in reqs}))
    assert order == ["0", "1", "2"]


def test_preemption_by_recompute_when_blocks_run_out():
    # 6 blocks of 4 tokens; two requests each growing to 12 tokens cannot both fit.
    s = make_scheduler(num_blocks=6, max_num_batched_tokens=64, max_model_len=24)
    a = make_request("a", list(range(8)), max_tokens=8)
    b = make_request("b", list(range(100, 108)), max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    finished, steps = run_to_end(s, [a, b])
    assert s.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the newest is preempted
    assert finished == {"a": "length", "b": "length"}
    assert a.output_token_ids == [7] * 8 and b.output_token_ids == [7] * 8
    # A resumed request is sent whole again, with the outputs it had before preemption.
    resumed = [n for st in steps for n in st.scheduled_new_reqs if n.req_id == "b" and n.output_token_ids]
    assert resumed and resumed[0].num_computed_tokens % 4 == 0
    assert any("b" in st.preempted_req_ids for st in steps)
    assert not any("b" in st.finished_req_ids for st in steps[:-1])
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_abort_running_and_waiting_frees_blocks():
    s = make_scheduler(max_num_seqs=1)
    a = make_request("a", [1, 2, 3, 4, 5])
    b = make_request("b", [1, 2, 3])
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.update_from_output(out, fake_run(out, {"a": a, "b": b}))
    s.abort_requests(["a", "b", "unknown"])
    assert a.status == RequestStatus.FINISHED_ABORTED and b.status == RequestStatus.FINISHED_ABORTED
    assert not s.has_unfinished_requests()
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert "a" in s.schedule().finished_req_ids


def test_stop_token_respects_min_tokens_and_ignore_eos():
    s = make_scheduler()
    a = make_request("a", [1, 2], max_tokens=5, min_tokens=2)
    a.sampling_params.eos_token_ids = [7]
    b = make_request("b", [1, 2], max_tokens=3, ignore_eos=True)
    b.sampling_params.eos_token_ids = [7]
    c = make_request("c", [1, 2], max_tokens=5, stop_token_ids=[7])
    for r in (a, b, c):
        s.add_request(r)
    finished, _ = run_to_end(s, [a, b, c])
    assert a.output_token_ids == [7, 7] and finished["a"] == "stop"
    assert b.output_token_ids == [7, 7, 7] and finished["b"] == "length"
    assert c.output_token_ids == [7] and c.stop_reason == 7


def test_generation_stops_at_max_model_len():
    s = make_scheduler(max_model_len=6)
    a = make_request("a", [1, 2, 3, 4], max_tokens=50)
    s.add_request(a)
    finished, _ = run_to_end(s, [a])
    assert finished == {"a": "length"} and a.num_tokens == 6


def test_prefix_cache_hit_skips_computed_tokens():
    s = make_scheduler(max_num_batched_tokens=64)
    a = make_request("a", list(range(10)), max_tokens=1)
    s.add_request(a)
    run_to_end(s, [a])
    b = make_request("b", list(range(10)), max_tokens=1)
    s.add_request(b)
    out = s.schedule()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 8
    assert out.num_scheduled_tokens == {"b": 2}


def test_async_schedules_ahead_with_placeholders():
    """Step t+1 is scheduled before step t reports: a decode runs on a placeholder token, a
    request whose pending token ends it is not scheduled again, and late results of a
    finished request are dropped even when its id is reused."""
    s = make_scheduler(max_num_batched_tokens=64)
    a = make_request("a", [1, 2, 3], max_tokens=3, ignore_eos=True)
    b = make_request("b", [4, 5], max_tokens=1, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    step0 = s.schedule()
    assert step0.num_scheduled_tokens == {"a": 3, "b": 2}
    assert (a.num_output_placeholders, b.num_output_placeholders) == (1, 1)
    step1 = s.schedule()  # step0 still in flight
    assert step1.num_scheduled_tokens == {"a": 1}  # b's one token is pending: it is done
    assert step1.scheduled_cached_reqs[0].new_token_ids == []  # its input is the placeholder
    assert a.num_computed_tokens == 4 and a.num_output_placeholders == 2
    out0 = s.update_from_output(step0, ModelRunnerOutput(["a", "b"], [[7], [8]], [None, None]))
    assert {o.request_id: o.new_token_ids for o in out0.outputs} == {"a": [7], "b": [8]}
    assert "b" not in s.requests and a.num_output_placeholders == 1
    step2 = s.schedule()  # the diff now carries step0's token
    assert step2.scheduled_cached_reqs[0].new_token_ids == [7]
    s.abort_requests(["a"])  # steps 1 and 2 still hold it
    s.add_request(make_request("a", [9, 9], max_tokens=2, ignore_eos=True))
    for step in (step1, step2):
        assert s.update_from_output(step, ModelRunnerOutput(["a"], [[5]], [None])).outputs == []
    assert s.requests["a"].output_token_ids == [] and not s._stale_in_flight
    assert s.kv.num_free_blocks == s.kv.num_blocks  # the old "a" gave its blocks back; the new one has none yet


def test_async_a_block_completed_by_the_last_step_is_cached_when_the_request_finishes():
    """Under async scheduling the step that fills a block runs on a placeholder token, so the
    block is only fully known once the request has finished: it must still reach the cache."""
    s = make_scheduler(max_num_batched_tokens=64, async_scheduling=True)
    a = make_request("a", [1, 2, 3], max_tokens=2, ignore_eos=True)
    s.add_request(a)
    step0, step1 = s.schedule(), s.schedule()  # step1 computes position 3 on step0's placeholder
    assert step1.num_scheduled_tokens == {"a": 1}
    s.update_from_output(step0, ModelRunnerOutput(["a"], [[7]], [None]))
    assert s.update_from_output(step1, ModelRunnerOutput(["a"], [[8]], [None])).outputs[0].finish_reason == "length"
    b = make_request("b", [1, 2, 3, 7, 9])
    s.add_request(b)
    assert s.schedule().num_scheduled_tokens == {"b": 1}  # positions 0-3 come from a's cached block


def test_a_stop_before_the_last_interleaved_pass_caches_no_block_that_pass_would_have_written():
    """PP=2 with 4 interleaved passes: the request stops on the third pass's token, which
    lands in a block's last slot; the fourth pass, not yet launched, is dropped, so that
    slot's KV is never written and the block must not serve a prefix hit."""
    s = make_scheduler(max_num_batched_tokens=64, pipeline_parallel_size=2, num_scheduler_steps=4)
    assert s.config.interleaves_passes
    r = make_request("r", [1, 2, 3, 4], max_tokens=20, stop_token_ids=[99])
    s.add_request(r)
    prefill = s.schedule()
    s.update_from_output(prefill, ModelRunnerOutput(["r"], [[10]], [None]))
    passes = s.schedule()
    assert passes.num_steps == 4  # KV of positions 4-7, one per pass
    for token in (11, 12, 99):  # the stop token is position 7
        out = s.update_from_output(passes, ModelRunnerOutput(["r"], [[token]], [None]))
    assert out.outputs[0].finish_reason == "stop"
    b = make_request("b", [1, 2, 3, 4, 10, 11, 12, 99, 5, 6])
    s.add_request(b)
    assert s.schedule().num_scheduled_tokens == {"b": 6}  # only the prompt's block is a hit


def test_pipeline_micro_batches_each_hold_up_to_max_num_seqs():
    # PP=2: two micro-batches in flight, each of at most --max-num-seqs requests, so up to
    # 2 x max_num_seqs run; a request in the pipeline is not scheduled again.
    s = make_scheduler(pipeline_parallel_size=2, max_num_seqs=2)
    reqs = {f"r{i}": make_request(f"r{i}", [1, 2, 3], max_tokens=4) for i in range(5)}
    for r in reqs.values():
        s.add_request(r)
    first = s.schedule()
    assert len(first.num_scheduled_tokens) == 2  # one batch never holds more than max_num_seqs
    second = s.schedule()
    assert len(second.num_scheduled_tokens) == 2
    assert not set(first.num_scheduled_tokens) & set(second.num_scheduled_tokens)
    assert len(s.running) == 4 and len(s.waiting) == 1
    # One batch in flight (--max-concurrent-batches 1): back to max_num_seqs running.
    one = make_scheduler(pipeline_parallel_size=2, max_num_seqs=2, max_concurrent_batches=1)
    for i in range(5):
        one.add_request(make_request(f"q{i}", [1, 2, 3], max_tokens=4))
    assert len(one.schedule().num_scheduled_tokens) == 2 and len(one.running) == 2


def test_pipeline_with_more_batch_slots_than_stages_splits_one_share_per_slot():
    # PP=2 with --max-concurrent-batches 3: the running requests split three ways (a share's
    # next step can wait for its tokens while the other two fill both stages), while at most
    # 2 x max_num_seqs run as with two slots. By default (async: 3 slots) two shares.
    assert make_scheduler(pipeline_parallel_size=2, async_scheduling=True).config.num_micro_batches == 2
    s = make_scheduler(pipeline_parallel_size=2, max_num_seqs=3, max_concurrent_batches=3)
    assert s.config.num_micro_batches == 3 and s.max_running == 6
    reqs = {f"r{i}": make_request(f"r{i}", [1, 2, 3], max_tokens=8) for i in range(8)}
    for r in reqs.values():
        s.add_request(r)
    prefills = [s.schedule() for _ in range(3)]
    assert [len(b.num_scheduled_tokens) for b in prefills] == [3, 3, 0]  # the cap; 6 running
    assert len(s.running) == 6 and len(s.waiting) == 2
    for out in prefills[:2]:
        s.update_from_output(out, fake_run(out, reqs))
    shares = [set(s.schedule().num_scheduled_tokens) for _ in range(3)]
    assert [len(b) for b in shares] == [2, 2, 2]  # decode: three disjoint shares of ceil(6 / 3)
    assert len(set().union(*shares)) == 6

def report_passes(s, out, requests, token=7):
    """Report each pass of a scheduled batch: a multi-step batch samples one token per request per pass."""
    if out.num_steps == 1:
        return s.update_from_output(out, fake_run(out, requests, token)).outputs
    ids = list(out.num_scheduled_tokens)
    outputs = []
    for _ in range(out.num_steps):
        outputs += s.update_from_output(out, ModelRunnerOutput(ids, [[token]] * len(ids), [None] * len(ids))).outputs
    return outputs


def test_shrink_steps_gives_back_a_multi_step_batchs_extra_passes():
    """A 4-pass decode batch cut to 1 pass (data-parallel replicas agree on the fewest) leaves
    the request exactly as a plain step would have: one token computed, one placeholder; the
    run then goes on to the same tokens, later batches running several passes again."""
    runs = {}
    for steps in (1, 4):
        s = make_scheduler(max_num_batched_tokens=64, num_scheduler_steps=steps)
        r = make_request("a", [1, 2, 3], max_tokens=6, ignore_eos=True)
        s.add_request(r)
        report_passes(s, s.schedule(), {"a": r})  # the prompt: a plain step either way
        runs[steps] = (s, r, s.schedule())
    (plain, p, out_plain), (multi, r, out_multi) = runs[1], runs[4]
    assert out_plain.num_steps == 1 and out_multi.num_steps == 4
    multi.shrink_steps(out_multi, 1)
    assert out_multi.num_steps == 1
    state = lambda q: (q.num_computed_tokens, q.num_in_flight_steps, q.num_output_placeholders)  # noqa: E731
    assert state(r) == state(p)
    finished, passes = {}, []
    for s, q, out in ((plain, p, out_plain), (multi, r, out_multi)):
        while out is not None:
            passes.append((s is multi, out.num_steps))
            for o in report_passes(s, out, {"a": q}):
                if o.finished:
                    finished[(s is multi)] = o.finish_reason
            out = s.schedule() if s.has_unfinished_requests() else None
    assert finished == {False: "length", True: "length"}
    assert r.output_token_ids == p.output_token_ids and len(r.output_token_ids) == 6
    assert any(multi_run and n > 1 for multi_run, n in passes)
    assert multi.kv.num_free_blocks == multi.kv.num_blocks


def test_interleaved_multi_step_never_preempts_a_request_with_passes_in_flight():
    """PP=2 with multi-step: a request whose passes are still in flight keeps its blocks (a
    pass launched after they went to another request would compute from that one's KV); the
    scheduler preempts one with nothing in flight — here the request being scheduled."""
    def pool_full_with_b_in_flight(**cfg):
        s = make_scheduler(num_blocks=3, block_size=4, max_num_seqs=2, **cfg)
        a, b = make_request("a", list(range(8)), max_tokens=9), make_request("b", list(range(4)), max_tokens=9)
        s.add_request(a)
        s.add_request(b)
        out = s.schedule()  # both prompts: 3 blocks, the whole pool
        s.update_from_output(out, fake_run(out, {"a": a, "b": b}))
        assert s.kv.num_free_blocks == 0
        b.num_in_flight_steps = 3  # b's multi-step batch still has passes out
        return s, a, b

    s, a, b = pool_full_with_b_in_flight(pipeline_parallel_size=2, num_scheduler_steps=4)
    assert s.config.interleaves_passes
    s.schedule()  # a's next token needs a block: none free, and b may not give its up
    assert b.status == RequestStatus.RUNNING and a.status == RequestStatus.PREEMPTED

    s, a, b = pool_full_with_b_in_flight(pipeline_parallel_size=2)  # no multi-step: the newest goes
    s.schedule()
    assert b.status == RequestStatus.PREEMPTED and a.status == RequestStatus.RUNNING
