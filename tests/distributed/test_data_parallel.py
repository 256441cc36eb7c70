"""Data parallelism (--data-parallel-size) over worker processes, gloo on CPU: two
replicas, each with its own scheduler and KV cache, stepping together. With expert
parallelism on the MoE models (experts spread over both replicas, tokens moved by
all-gather + reduce-scatter or by all-to-all) and on a dense model, greedy tokens equal one device; a rank with nothing
to do keeps stepping with dummy batches (no deadlock), a load skewed onto one rank
completes, and every rank's KV pool is full afterwards — also with async scheduling."""
import pytest

from braid import LLM, SamplingParams
from braid.core.scheduler import Scheduler
from braid.engine.arg_utils import EngineArgs
from tests.engine.conftest import assert_pool_full
from tests.tiny_checkpoints import make_tiny_checkpoint

pytestmark = pytest.mark.distributed

PROMPTS = [[1, 17, 250, 33, 99, 5, 300, 42, 7], [1, 45, 9, 310, 27], [3, 4, 5], list(range(3, 40)),
           [7, 7, 8, 9, 100, 200], [11, 12]]


def _generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _check_dp(model, **parallel):
    # Skewed: the even requests (which the balancer puts on rank 0) run 6x longer.
    params = [SamplingParams(temperature=0, max_tokens=24 if i % 2 == 0 else 4, ignore_eos=True)
              for i in range(len(PROMPTS))]
    want = _generate(LLM(model, kv_cache_memory="64MiB"), PROMPTS, params)
    llm = LLM(model, kv_cache_memory="64MiB", data_parallel_size=2, **parallel)
    core = llm.llm_engine.engine_core
    try:
        assert type(core).__name__ == "DPEngineCore"
        ranks = []
        add = core.add_request

        def recording(request):
            add(request)
            ranks.append(core.rank_of[request.request_id])

        core.add_request = recording
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
        assert all(o.metrics.queue_time >= 0 and o.metrics.prefill_time > 0 for o in outs)  # both ranks' schedule times
        assert sorted(set(ranks)) == [0, 1]  # both replicas had requests
        assert core.num_dummy_steps > 0      # rank 1 idled while rank 0's long requests ran
        assert all(kv.num_free_blocks == kv.num_blocks for kv in core.kv_managers)
        # One request: the other replica only ever runs dummy steps.
        dummies = core.num_dummy_steps
        assert _generate(llm, PROMPTS[:1], params[:1]) == want[:1]
        assert core.num_dummy_steps - dummies >= 23  # dummy passes: one per pass of the busy replica
        assert_pool_full(llm)
        assert core.max_in_flight_seen == (2 if parallel.get("async_scheduling") else 1)
    finally:
        core.shutdown()


@pytest.mark.parametrize("arch,backend", [("qwen3_moe", "allgather_reducescatter"), ("qwen3_moe", "all_to_all"),
                                          ("deepseek_v2", "allgather_reducescatter")])
def test_dp2_with_expert_parallel_equals_single_device(tmp_path, arch, backend):
    _check_dp(make_tiny_checkpoint(arch, tmp_path / arch), enable_expert_parallel=True, all2all_backend=backend)


def test_dp2_x_tp2_moe_and_dp2_dense(tmp_path):
    _check_dp(make_tiny_checkpoint("qwen3_moe", tmp_path / "moe"), tensor_parallel_size=2,
              enable_expert_parallel=True)
    _check_dp(make_tiny_checkpoint("llama", tmp_path / "llama"))


def test_dp2_async_scheduling(tmp_path):
    """Two lockstep steps in flight: the replicas' next step is launched before the current
    one's tokens are read; MoE with expert parallelism and a dense model equal one device."""
    _check_dp(make_tiny_checkpoint("qwen3_moe", tmp_path / "moe"), enable_expert_parallel=True,
              async_scheduling=True)
    _check_dp(make_tiny_checkpoint("llama", tmp_path / "llama"), async_scheduling=True)


def test_dp2_multi_step_scheduling(tmp_path, monkeypatch):
    """Multi-step with data parallelism: every replica runs the same number of passes per
    step (an idle one runs as many dummy passes); MoE x EP, alone and with async scheduling,
    and a dense model equal one device, and multi-pass steps really ran."""
    from braid.engine import dp_core

    passes_run = []
    launch = dp_core.DPEngineCore._schedule_and_launch

    def recording(self):
        launched = launch(self)
        if launched:
            counts = {o.num_steps for o in self.in_flight[-1][0]}
            assert len(counts) == 1, counts  # the replicas agree on the pass count
            passes_run.append(counts.pop())
        return launched

    monkeypatch.setattr(dp_core.DPEngineCore, "_schedule_and_launch", recording)
    shrunk = []
    shrink = Scheduler.shrink_steps
    monkeypatch.setattr(Scheduler, "shrink_steps", lambda self, o, n: shrunk.append((o.num_steps, n)) or shrink(self, o, n))
    moe = make_tiny_checkpoint("qwen3_moe", tmp_path / "moe")
    # 16-token chunks: one replica still prefills its 37-token prompt while the other could
    # decode 4 passes — it gives 3 back.
    _check_dp(moe, enable_expert_parallel=True, num_scheduler_steps=4, max_num_batched_tokens=16)
    assert shrunk
    _check_dp(moe, enable_expert_parallel=True, num_scheduler_steps=4, async_scheduling=True)
    _check_dp(make_tiny_checkpoint("llama", tmp_path / "llama"), num_scheduler_steps=3)
    assert max(passes_run) > 1


def test_unsupported_data_parallel_combinations_are_refused(tmp_path):
    model = make_tiny_checkpoint("qwen3_moe", tmp_path / "moe")
    with pytest.raises(ValueError, match="--data-parallel-size 2 with --pipeline-parallel-size"):
        EngineArgs(model=model, data_parallel_size=2, pipeline_parallel_size=2).create_engine_config()
    with pytest.raises(ValueError, match="uni runs one device.*--data-parallel-size 2"):  # the flag that made 2 ranks
        EngineArgs(model=model, data_parallel_size=2, distributed_executor_backend="uni").create_engine_config()
    with pytest.raises(ValueError, match="--data-parallel-size must be >= 1"):
        EngineArgs(model=model, data_parallel_size=0).create_engine_config()
    with pytest.raises(ValueError, match="--all2all-backend must be one of allgather_reducescatter, all_to_all"):
        EngineArgs(model=model, data_parallel_size=2, enable_expert_parallel=True,
                   all2all_backend="pplx").create_engine_config()


def test_dp_refuses_a_kv_cache_smaller_than_max_model_len(tmp_path):
    """As without DP: a replica's pool that cannot hold one --max-model-len request fails the
    start (it used to start, and such a request then waited forever)."""
    model = make_tiny_checkpoint("llama", tmp_path / "llama")  # 512 bytes of KV per token
    with pytest.raises(ValueError, match="fewer than --max-model-len"):
        LLM(model, kv_cache_memory="256KiB", max_model_len=1024, data_parallel_size=2)


def test_dp_generate_interrupted_while_waiting_leaves_the_llm_usable(tmp_path, monkeypatch):
    """Ctrl-C in LLM.generate while the DP core waits for a replica's tokens: the next generate
    gives the same greedy tokens and every pool is full after (the step lost that replica's
    pending reply, and every later generate failed with IndexError)."""
    from braid.executor.multiproc import MultiprocExecutor

    llm = LLM(make_tiny_checkpoint("llama", tmp_path / "llama"), kv_cache_memory="64MiB", data_parallel_size=2)
    core = llm.llm_engine.engine_core
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        want = _generate(llm, PROMPTS, params)
        next_output = MultiprocExecutor.next_output
        calls = []

        def interrupted_once(self, rank):
            calls.append(rank)
            if rank == core.config.parallel.output_ranks[1] and len(calls) > 6 and not hasattr(self, "_cut"):
                self._cut = True  # as Ctrl-C lands in the wait, before the reply is read
                raise KeyboardInterrupt
            return next_output(self, rank)

        monkeypatch.setattr(MultiprocExecutor, "next_output", interrupted_once)
        with pytest.raises(KeyboardInterrupt):
            _generate(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        assert _generate(llm, PROMPTS, params) == want
        while llm.llm_engine.engine_core.has_unfinished_requests():
            llm.llm_engine.step()
        assert all(kv.num_free_blocks == kv.num_blocks for kv in core.kv_managers)
    finally:
        core.shutdown()
