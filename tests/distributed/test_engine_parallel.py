"""The whole engine over worker processes (--distributed-executor-backend mp, gloo on CPU):
tensor parallelism, pipeline parallelism with micro-batches in flight, and both. Greedy
tokens equal the single-device run on tiny random checkpoints and on SmolLM2, also under
async scheduling (and multi-step for TP), chunked prefill, prefix caching and preemption;
a killed worker ends the engine with a clear error within 10 s; the KV pool is full after
each scenario."""
import os
import signal
import time

import pytest

from braid import LLM, SamplingParams
from braid.engine.arg_utils import EngineArgs
from braid.errors import EngineDeadError
from braid.engine.llm_engine import LLMEngine
from braid.executor.multiproc import WorkerError
from braid.transformers_utils import default_model_path
from tests.engine.conftest import assert_pool_full
from tests.tiny_checkpoints import make_tiny_checkpoint

pytestmark = pytest.mark.distributed

PROMPTS = [[1, 17, 250, 33, 99, 5, 300, 42, 7], [1, 45, 9, 310, 27], [3, 4, 5], list(range(3, 40))]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _tokens(llm, prompts, params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {"num_key_value_heads": 1}),
                                            ("qwen3_moe", {"mlp_only_layers": [0]}), ("deepseek_v2", {}),
                                            ("mixtral", {})],
                         ids=["llama", "qwen3-1kv", "qwen3-moe", "deepseek-v2", "mixtral"])
def test_tp2_equals_single_device(tmp_path, arch, overrides):
    model = make_tiny_checkpoint(arch, tmp_path / arch, **overrides)
    want = _tokens(LLM(model, kv_cache_memory="64MiB"), PROMPTS)
    extras = [{}, {"async_scheduling": True, "num_scheduler_steps": 4}]
    if arch in ("qwen3_moe", "deepseek_v2", "mixtral"):  # whole experts per rank, tokens exchanged
        extras.append({"enable_expert_parallel": True, "async_scheduling": True})
    for extra in extras:
        llm = LLM(model, kv_cache_memory="64MiB", tensor_parallel_size=2, **extra)
        try:
            assert _tokens(llm, PROMPTS) == want, extra
            assert_pool_full(llm)
        finally:
            llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    return default_model_path()


def test_smollm2_tp3_equals_single_device(smollm2_path):
    # SmolLM2-135M has 9 query and 3 KV heads: 3 ranks divide them (2 do not, see below).
    tok = LLM(smollm2_path, max_model_len=256, kv_cache_memory="64MiB")
    prompts = [tok.get_tokenizer().encode(t) for t in ("The capital of France is", "def fibonacci(n):",
                                                        "Once upon a time, in a quiet village,")]
    want = _tokens(tok, prompts)
    llm = LLM(smollm2_path, max_model_len=256, kv_cache_memory="64MiB", tensor_parallel_size=3)
    try:
        assert _tokens(llm, prompts) == want
        assert_pool_full(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_tp_that_does_not_divide_the_heads_is_refused(smollm2_path):
    with pytest.raises(ValueError, match="--tensor-parallel-size 2 must divide the model's num_attention_heads"):
        EngineArgs(model=smollm2_path, tensor_parallel_size=2).create_engine_config()


@pytest.mark.parametrize("arch,overrides,parallel,refused", [
    ("qwen3", {"num_attention_heads": 6, "num_key_value_heads": 3}, {"tensor_parallel_size": 2},
     "must divide the model's num_key_value_heads \\(3\\)"),
    ("qwen3", {"num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 96}, {"tensor_parallel_size": 3},
     None),
    ("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 2}, {"tensor_parallel_size": 4}, None),
    ("qwen3_moe", {"moe_intermediate_size": 33}, {"tensor_parallel_size": 2},
     "must divide the model's moe_intermediate_size \\(33\\)"),
    ("qwen3_moe", {"moe_intermediate_size": 33}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}, None),
    ("deepseek_v2", {"moe_intermediate_size": 33}, {"tensor_parallel_size": 2, "enable_expert_parallel": True},
     "moe_intermediate_size x n_shared_experts \\(33\\)"),
    ("deepseek_v2", {"num_attention_heads": 4, "num_key_value_heads": 3}, {"tensor_parallel_size": 2}, None),
    ("llama", {}, {"tensor_parallel_size": "2"}, "--tensor-parallel-size must be an integer"),
], ids=["kv3-tp2", "kv3-tp3", "kv2-tp4-replicated", "moe33-tp2", "moe33-tp2-ep", "deepseek-shared33-ep",
        "mla-ignores-kv-heads", "tp-str"])
def test_tensor_parallel_shapes_are_checked_before_any_worker_starts(tmp_path, arch, overrides, parallel, refused):
    model = make_tiny_checkpoint(arch, tmp_path / arch, **overrides)
    args = EngineArgs(model=model, device="cpu", **parallel)  # on a GPU host, no GPU-count refusal
    if refused is None:
        assert args.create_engine_config().parallel.world_size == parallel["tensor_parallel_size"]
    else:
        with pytest.raises(ValueError, match=refused):
            args.create_engine_config()


def _shm_rendezvous_dirs() -> set[str]:
    import glob

    return set(glob.glob("/dev/shm/braid-dist-*"))


def test_a_failed_start_leaves_no_worker_and_no_rendezvous_dir(tmp_path):
    import psutil

    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    weights = os.path.join(model, "model.safetensors")
    with open(weights, "r+b") as f:  # the workers fail loading it; the config is fine
        f.truncate(os.path.getsize(weights) // 2)
    def live_children() -> set[int]:
        live = set()
        for p in psutil.Process().children(recursive=True):
            try:  # multiprocessing's resource tracker: one per process, started by the first spawn
                if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                    live.add(p.pid)
            except psutil.NoSuchProcess:
                pass
        return live

    before, dirs_before = live_children(), _shm_rendezvous_dirs()
    with pytest.raises(WorkerError):
        LLM(model, kv_cache_memory="16MiB", tensor_parallel_size=2)
    assert live_children() - before == set()  # the ranks are reaped when the error reaches us
    assert _shm_rendezvous_dirs() - dirs_before == set()


def test_killed_worker_ends_the_engine_within_10s(tmp_path):
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    engine = LLMEngine.from_engine_args(EngineArgs(model=model, kv_cache_memory="64MiB", tensor_parallel_size=2))
    executor = engine.engine_core.executor
    try:
        engine.add_request("a", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=10_000, ignore_eos=True,
                                                                                 temperature=0))
        engine.step()
        os.kill(executor.procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerError, match="worker rank 1 .* died"):
            while time.monotonic() - start < 30:
                engine.step()
        assert time.monotonic() - start < 10
        # The failure ended the engine: the survivor is gone already (it held its device),
        # and the engine says why from then on.
        assert not any(p.is_alive() for p in executor.procs)
        with pytest.raises(EngineDeadError, match="worker failure: worker rank 1"):
            engine.step()
    finally:
        executor.shutdown()


def test_generate_interrupted_while_waiting_leaves_the_llm_usable(tmp_path, monkeypatch):
    """Ctrl-C in LLM.generate while the core waits for a pass's tokens (TP=2, async: two
    batches in flight) leaves that pass queued, to be waited for again; the next generate
    gives the same greedy tokens and the pool is full after. The pass used to leave its queue
    first and was lost: every later reply then went to the pass launched after its own."""
    from braid.executor.multiproc import MultiprocExecutor

    llm = LLM(make_tiny_checkpoint("llama", tmp_path / "llama"), kv_cache_memory="64MiB", tensor_parallel_size=2,
              async_scheduling=True)
    core = llm.llm_engine.engine_core
    try:
        next_output, replies, interrupt_at = MultiprocExecutor.next_output, [], [-1]

        def interrupted_once(self, rank):
            if len(replies) == interrupt_at[0]:  # as Ctrl-C lands in the wait, before the reply is read
                interrupt_at[0] = -1
                raise KeyboardInterrupt
            replies.append(next_output(self, rank))
            return replies[-1]

        monkeypatch.setattr(MultiprocExecutor, "next_output", interrupted_once)
        want = _tokens(llm, PROMPTS)
        interrupt_at[0] = len(replies) + 5
        with pytest.raises(KeyboardInterrupt):
            _tokens(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        assert len(core.report_order) == core._num_launches - len(replies)  # one reply per launched pass
        assert _tokens(llm, PROMPTS) == want
        assert_pool_full(llm)
        assert not core.in_flight and not core.scheduler._stale_in_flight  # every pass launched was reported
    finally:
        core.shutdown()


def _record_pipelining(llm):
    """(batches already in flight, tokens scheduled) at every schedule call."""
    core = llm.llm_engine.engine_core
    seen = []
    schedule = core.scheduler.schedule

    def recording():
        out = schedule()
        seen.append((len(core.in_flight), out.total_num_scheduled_tokens))
        return out

    core.scheduler.schedule = recording
    return seen


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {"num_key_value_heads": 1})],
                         ids=["llama", "qwen3-1kv"])
def test_pp2_equals_single_device(tmp_path, arch, overrides):
    model = make_tiny_checkpoint(arch, tmp_path / arch, **overrides)
    want = _tokens(LLM(model, kv_cache_memory="64MiB"), PROMPTS)
    for extra in ({}, {"async_scheduling": True}):
        llm = LLM(model, kv_cache_memory="64MiB", pipeline_parallel_size=2, **extra)
        seen = _record_pipelining(llm)
        try:
            assert _tokens(llm, PROMPTS) == want, extra
            assert_pool_full(llm)
        finally:
            llm.llm_engine.engine_core.shutdown()
        # A second micro-batch went in while the first was still in the pipeline.
        assert any(in_flight >= 1 and tokens > 0 for in_flight, tokens in seen), extra


def test_tp2_x_pp2_equals_single_device(tmp_path):
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    want = _tokens(LLM(model, kv_cache_memory="64MiB"), PROMPTS)
    llm = LLM(model, kv_cache_memory="64MiB", tensor_parallel_size=2, pipeline_parallel_size=2,
              async_scheduling=True)
    try:
        assert _tokens(llm, PROMPTS) == want
        assert_pool_full(llm)
        core = llm.llm_engine.engine_core
        assert not core.in_flight and not core.scheduler._stale_in_flight  # every pass launched was reported
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("parallel", [
    dict(pipeline_parallel_size=2, num_scheduler_steps=4),
    dict(pipeline_parallel_size=2, num_scheduler_steps=4, async_scheduling=True),
    dict(pipeline_parallel_size=4, num_scheduler_steps=3),
    dict(tensor_parallel_size=2, pipeline_parallel_size=2, num_scheduler_steps=4, async_scheduling=True),
    dict(pipeline_parallel_size=2, num_scheduler_steps=4, async_scheduling=True, max_concurrent_batches=3),
], ids=["pp2-ms4", "pp2-ms4-async", "pp4-ms3", "tp2-pp2-ms4-async", "pp2-ms4-async-3-shares"])
def test_multi_step_through_the_pipeline_equals_single_device(tmp_path, parallel):
    """Each pass of a multi-step decode batch feeds the last stage's samples back to the first
    stage (middle stages only advance positions and cache slots)."""
    model = make_tiny_checkpoint("llama", tmp_path / "llama", num_hidden_layers=4)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (13, 7, 10, 5)]
    want = _tokens(LLM(model, kv_cache_memory="64MiB"), PROMPTS, params)
    llm = LLM(model, kv_cache_memory="64MiB", **parallel)
    core = llm.llm_engine.engine_core
    steps = []
    schedule = core.scheduler.schedule

    def recording():
        out = schedule()
        steps.append(out.num_steps)
        return out

    core.scheduler.schedule = recording
    try:
        assert _tokens(llm, PROMPTS, params) == want
        assert max(steps) == parallel["num_scheduler_steps"]  # multi-step batches ran
        assert_pool_full(llm)
    finally:
        core.shutdown()


def test_interleaved_multi_step_with_early_stops_and_arrivals(tmp_path):
    """PP=2 multi-step passes interleave across micro-batches (the engine core launches each
    further pass). Requests stop mid-batch on a stop token while their batch has passes left,
    and new requests arriving meanwhile get their blocks (a tight pool) and are launched in
    between: those later passes must write no KV (they would overwrite the newcomers').
    Every request's tokens equal the single device's."""
    model = make_tiny_checkpoint("llama", tmp_path / "llama", num_hidden_layers=4)
    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + i % 7)] for i in range(20)]
    single = LLM(model, kv_cache_memory="64MiB")
    first = _tokens(single, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    # Each request stops at the first sight of its 5th greedy token (often mid multi-step batch).
    params = [SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[t[4]]) for t in first]
    want = _tokens(single, prompts, params)
    assert any(len(w) < 24 for w in want)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, num_gpu_blocks_override=18, max_model_len=64, pipeline_parallel_size=2,
        num_scheduler_steps=4, async_scheduling=True))
    core = engine.engine_core
    continued = []
    cont = core.executor.continue_model_async
    core.executor.continue_model_async = lambda batch_id: continued.append(batch_id) or cont(batch_id)
    try:
        arrivals = iter(range(len(prompts)))
        for _ in range(6):
            i = next(arrivals)
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, params[i])
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = out.outputs[0].token_ids
                    i = next(arrivals, None)  # a newcomer takes the freed blocks
                    if i is not None:
                        engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, params[i])
        assert [done[i] for i in range(len(prompts))] == want
        assert len(set(continued)) > 1                      # several batches' passes launched one by one
        assert core.scheduler.num_wasted_tokens > 0         # passes ran past stopped requests
        kv = engine.kv_cache_manager
        assert kv.num_free_blocks == kv.num_blocks
    finally:
        core.shutdown()


def test_interleaved_passes_after_an_abort_write_no_kv(tmp_path):
    """A request is aborted while its PP=2 multi-step batch still has passes to launch; with the
    pool full, a newcomer gets exactly its blocks and is launched before those passes. They
    must write no KV: the newcomer's tokens equal the single device's. (Fails with the
    dead-row masking of worker/multi_step_passes.py taken out.)"""
    model = make_tiny_checkpoint("llama", tmp_path / "llama", num_hidden_layers=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kept, newcomer = list(range(40, 50)), [(5 * j) % 300 + 3 for j in range(32)]
    want = _tokens(LLM(model, kv_cache_memory="64MiB", max_model_len=80), [kept, newcomer], params)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, num_gpu_blocks_override=7, max_model_len=80, pipeline_parallel_size=2, num_scheduler_steps=8,
        enable_prefix_caching=False))
    core, kv = engine.engine_core, engine.kv_cache_manager
    try:
        engine.add_request("gone", {"prompt_token_ids": list(range(3, 13))}, params)
        engine.add_request("kept", {"prompt_token_ids": kept}, params)
        done, aborted = {}, False
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            if aborted:
                continue
            pending = [b for b in core.in_flight if "gone" in b.scheduler_output.num_scheduled_tokens and b.to_launch]
            if pending and kv.num_free_blocks == 0 and core.scheduler.requests["gone"].num_output_tokens >= 16:
                engine.abort_request(["gone"])
                engine.add_request("new", {"prompt_token_ids": newcomer}, params)
                aborted = True
        assert aborted
        assert [done["kept"], done["new"]] == want
        assert kv.num_free_blocks == kv.num_blocks
    finally:
        core.shutdown()


def test_smollm2_pp2_with_chunks_prefix_hits_and_preemption(smollm2_path):
    single = LLM(smollm2_path, max_model_len=256, kv_cache_memory="64MiB")
    tokenizer = single.get_tokenizer()
    shared = "You are a helpful assistant. Answer briefly and precisely. "
    prompts = [tokenizer.encode(shared + q) for q in ("The capital of France is", "def fibonacci(n):",
                                                      "Once upon a time,", "Water boils at", "The largest planet is",
                                                      "import numpy as np")]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = _tokens(single, prompts, params)
    # 13 blocks of 16 tokens cannot hold six growing ~35-token requests; a 24-token budget chunks prompts.
    llm = LLM(smollm2_path, max_model_len=128, num_gpu_blocks_override=13, max_num_batched_tokens=24,
              pipeline_parallel_size=2, async_scheduling=True)
    try:
        assert _tokens(llm, prompts, params) == want
        assert llm.llm_engine.last_stats.num_preemptions > 0
        assert _tokens(llm, prompts[:2], params) == want[:2]  # again, now with prefix hits
        assert llm.llm_engine.last_stats.prefix_cache_hits > 0
        assert_pool_full(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_pp2_uneven_partition_and_one_batch_in_flight(tmp_path):
    # 4 layers split 1 + 3; --max-concurrent-batches 1 runs one batch through both stages at
    # a time (the baseline micro-batching is measured against): same tokens either way.
    model = make_tiny_checkpoint("llama", tmp_path / "llama", num_hidden_layers=4)
    want = _tokens(LLM(model, kv_cache_memory="64MiB"), PROMPTS)
    llm = LLM(model, kv_cache_memory="64MiB", pipeline_parallel_size=2, pp_layer_partition="1,3",
              max_concurrent_batches=1)
    seen = _record_pipelining(llm)
    try:
        assert llm.llm_engine.engine_core.max_batches_in_flight == 1
        assert _tokens(llm, PROMPTS) == want
        assert_pool_full(llm)
        core = llm.llm_engine.engine_core
        assert not core.in_flight and not core.scheduler._stale_in_flight  # every pass launched was reported
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert all(in_flight == 0 for in_flight, _ in seen)  # never a second batch in the pipeline


def test_unsupported_pipeline_combinations_are_refused(smollm2_path):
    with pytest.raises(ValueError, match="--pp-layer-partition 10,10 must sum to the model's 30 layers"):
        EngineArgs(model=smollm2_path, pipeline_parallel_size=2, pp_layer_partition="10,10").create_engine_config()
    with pytest.raises(ValueError, match="--pp-layer-partition 30 must give one layer count"):
        EngineArgs(model=smollm2_path, pipeline_parallel_size=2, pp_layer_partition="30").create_engine_config()
    with pytest.raises(ValueError, match="--pp-layer-partition must be comma-separated"):
        EngineArgs(model=smollm2_path, pipeline_parallel_size=2, pp_layer_partition="a,b").create_engine_config()
    with pytest.raises(ValueError, match="--max-concurrent-batches must be >= 1"):
        EngineArgs(model=smollm2_path, max_concurrent_batches=0).create_engine_config()
    with pytest.raises(ValueError, match="--pipeline-parallel-size 31 exceeds"):
        EngineArgs(model=smollm2_path, pipeline_parallel_size=31).create_engine_config()


def test_every_rank_writes_its_timeline(tmp_path):
    import json

    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    trace_dir = tmp_path / "trace"
    llm = LLM(model, kv_cache_memory="64MiB", pipeline_parallel_size=2, trace_dir=str(trace_dir))
    try:
        _tokens(llm, PROMPTS)
    finally:
        llm.llm_engine.engine_core.shutdown()
    for rank in (0, 1):
        files = [f for f in os.listdir(trace_dir) if f.startswith(f"braid-trace-worker-{rank}")]
        assert len(files) == 1, os.listdir(trace_dir)
        names = {e.get("name") for e in json.load(open(trace_dir / files[0]))["traceEvents"]}
        assert {"prepare_inputs", "launch"} <= names, names


def test_served_ranks_write_their_timelines_when_the_server_stops(tmp_path):
    # `braid serve --trace-dir` ends its engine core with SIGTERM: the core stops its healthy
    # workers in order (each writes its timeline) before it writes its own.
    import asyncio

    from braid.engine.async_llm import AsyncLLM
    from braid.observe.trace_summary import load_trace_events

    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    trace_dir = tmp_path / "trace"
    llm = AsyncLLM.from_engine_args(EngineArgs(model=model, kv_cache_memory="64MiB", tensor_parallel_size=2,
                                               trace_dir=str(trace_dir)))
    try:
        async def one():
            return [o async for o in llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, "r")]

        assert asyncio.run(one())[-1].finished
    finally:
        llm.shutdown()
    assert llm.client.process.exitcode == 0
    for who in ("engine-core", "worker-0", "worker-1"):
        files = [f for f in os.listdir(trace_dir) if f.startswith(f"braid-trace-{who}")]
        assert len(files) == 1, os.listdir(trace_dir)
        names = {e.get("name") for e in load_trace_events(str(trace_dir / files[0]))}
        assert ("step" if who == "engine-core" else "launch") in names, (who, names)
