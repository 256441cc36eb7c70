"""The Ray executor (--distributed-executor-backend ray) on a local Ray cluster, gloo on
CPU: TP=2 and TP=2 x PP=2 with async scheduling, and data parallelism (DP=2 x EP on a
MoE model, each replica's tokens from its own output actor), give the single-device
greedy tokens, the KV pools are full afterwards, and a killed actor ends the engine with
an error naming its rank within 10 s (a method that raises names its rank too). Engines
that started their own Ray cluster share it, and the last one stops it, even when its
workers are killed (a served core's stop)."""
import os
import signal
import time

import psutil
import pytest

from braid import LLM, SamplingParams
from braid.engine.arg_utils import EngineArgs
from braid.engine.llm_engine import LLMEngine
from braid.executor.worker_setup import WorkerError
from tests.engine.conftest import assert_pool_full
from tests.tiny_checkpoints import make_tiny_checkpoint

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.distributed

PROMPTS = [[1, 17, 250, 33, 99, 5, 300, 42, 7], [1, 45, 9, 310, 27], [3, 4, 5], list(range(3, 40))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def local_ray():
    # One local cluster for the module (starting Ray costs seconds); the executor joins it.
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _tokens(llm, params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _local_cluster_processes():
    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in psutil.Process().children(recursive=True)
            if p.name() in ("gcs_server", "raylet") and alive(p)]


def test_ray_engines_share_the_cluster_they_started_and_the_last_stops_it(tmp_path):
    # First in the module, before `local_ray`: no cluster yet, so the first engine starts one,
    # as for a user who never called ray.init, and a second joins it. Stopping the first must
    # leave the second working (it took the cluster down under it, and the second's shutdown
    # then started a fresh one). The last one stops it even going down hard: a served core
    # stops with kill_workers, then os._exit, and a cluster left to die with the process left
    # its raylet's agents running for over 10 s after `braid serve` exited.
    assert not ray.is_initialized(), "this test must run before any other starts Ray"
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    llms = [LLM(model, kv_cache_memory="64MiB", distributed_executor_backend="ray") for _ in range(2)]
    first, second = (llm.llm_engine.engine_core for llm in llms)
    try:
        first.shutdown()
        assert ray.is_initialized()
        assert len(_tokens(llms[1], SamplingParams(temperature=0, max_tokens=2))) == len(PROMPTS)
        assert _local_cluster_processes()
        second.kill_workers()
        assert not ray.is_initialized()
        assert not _local_cluster_processes()
        second.kill_workers()  # again, and shutdown after it: nothing left to do, no error
    finally:
        first.shutdown()
        second.shutdown()


def _actor_env(actor):
    def read(self):
        import os

        import ray

        return dict(ray.get_runtime_context().runtime_env), os.environ.get("NVSHMEM_DISABLE_NVLS")

    return ray.get(actor.__ray_call__.remote(read))


def test_ray_tp2_and_tp2_pp2_equal_single_device(tmp_path, local_ray, monkeypatch):
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    want = _tokens(LLM(model, kv_cache_memory="64MiB"))
    # The driver's worker environment reaches the actors through start(), not a runtime_env of
    # their own (Ray could not give them the workers it had started, and reaped those: its
    # idle-worker exit now and then aborts with "Fatal Python error: Aborted").
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "7")
    # The last: multi-step passes interleaved across micro-batches (continue_model calls).
    for parallel in ({"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
                     {"pipeline_parallel_size": 2, "num_scheduler_steps": 4}):
        llm = LLM(model, kv_cache_memory="64MiB", distributed_executor_backend="ray", async_scheduling=True,
                  **parallel)
        try:
            executor = llm.llm_engine.engine_core.executor
            assert type(executor).__name__ == "RayExecutor"
            assert all(_actor_env(a) == ({}, "7") for a in executor.actors)
            assert _tokens(llm) == want, parallel
            assert_pool_full(llm)
        finally:
            llm.llm_engine.engine_core.shutdown()


def test_ray_data_parallel_moe_equals_single_device(tmp_path, local_ray):
    model = make_tiny_checkpoint("qwen3_moe", tmp_path / "moe")
    # Uneven lengths: one replica idles (dummy batches through the actors) while the other runs.
    params = [SamplingParams(temperature=0, max_tokens=16 if i % 2 == 0 else 3, ignore_eos=True)
              for i in range(len(PROMPTS))]
    want = _tokens(LLM(model, kv_cache_memory="64MiB"), params)
    llm = LLM(model, kv_cache_memory="64MiB", distributed_executor_backend="ray", data_parallel_size=2,
              enable_expert_parallel=True)
    core = llm.llm_engine.engine_core
    try:
        assert type(core).__name__ == "DPEngineCore" and type(core.executor).__name__ == "RayExecutor"
        assert _tokens(llm, params) == want
        assert core.num_dummy_steps > 0
        assert all(kv.num_free_blocks == kv.num_blocks for kv in core.kv_managers)
    finally:
        core.shutdown()


def test_ray_failed_or_killed_actor_ends_the_engine_naming_its_rank(tmp_path, local_ray):
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    engine = LLMEngine.from_engine_args(EngineArgs(model=model, kv_cache_memory="64MiB", tensor_parallel_size=2,
                                                   distributed_executor_backend="ray"))
    executor = engine.engine_core.executor
    try:
        # A call that raises in one actor (say an allocation at setup) names that rank too.
        def fail_sizing(self):
            def raise_oom():
                raise MemoryError("injected: cannot size the KV cache")

            self.worker.determine_num_blocks = raise_oom

        ray.get(executor.actors[1].__ray_call__.remote(fail_sizing))
        with pytest.raises(WorkerError, match="(?s)worker rank 1 failed.*injected: cannot size"):
            executor.determine_num_blocks()
        pid = ray.get(executor.actors[1].__ray_call__.remote(lambda self: os.getpid()))
        engine.add_request("a", {"prompt_token_ids": PROMPTS[0]},
                           SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0))
        engine.step()
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerError, match="worker rank 1 died"):
            while time.monotonic() - start < 10:  # what an idle served core polls (/health)
                executor.check_alive()
                time.sleep(0.05)
        with pytest.raises(WorkerError, match="worker rank 1 died"):
            while True:
                engine.step()
        assert time.monotonic() - start < 10
    finally:
        engine.engine_core.shutdown()
