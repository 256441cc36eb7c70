"""The whole engine with tensor parallelism over worker processes (--distributed-executor-backend
mp, gloo on CPU): greedy tokens equal the single-device run on tiny random checkpoints and on
SmolLM2, also under async scheduling and multi-step; a killed worker ends the engine with a
clear error within 10 s; the KV pool is full afterwards."""
import os
import signal
import time

import pytest

from braid import LLM, SamplingParams
from braid.engine.arg_utils import EngineArgs
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


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {"num_key_value_heads": 1})],
                         ids=["llama", "qwen3-1kv"])
def test_tp2_equals_single_device(tmp_path, arch, overrides):
    model = make_tiny_checkpoint(arch, tmp_path / arch, **overrides)
    want = _tokens(LLM(model, kv_cache_memory="64MiB"), PROMPTS)
    for extra in ({}, {"async_scheduling": True, "num_scheduler_steps": 4}):
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
    finally:
        executor.shutdown()
    assert not any(p.is_alive() for p in executor.procs)
