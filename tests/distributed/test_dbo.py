"""Dual-batch overlap on CPU: DBO on equals DBO off token for token — one device, dense
TP=2 (the all-reduces are the hand-over points), MoE with DP=2 x EP (the all-to-alls
are), prefill and decode steps, and a prefill chunk cut in the middle (its second part
continues in the second micro-batch). A DP replica that runs a dummy batch votes no,
so that step runs whole everywhere."""
import pytest

from braid import LLM, SamplingParams
from braid.engine.arg_utils import EngineArgs
from tests.engine.conftest import assert_pool_full
from tests.tiny_checkpoints import make_tiny_checkpoint

PROMPTS = [[1, 17, 250, 33, 99, 5, 300, 42, 7], [1, 45, 9, 310, 27], [3, 4, 5], list(range(3, 40)),
           [7, 7, 8, 9, 100, 200], [11, 12]]
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# Low thresholds so that small test batches split: 3 tokens of decode, 8 of prefill.
DBO = dict(enable_dbo=True, dbo_decode_token_threshold=3, dbo_prefill_token_threshold=8)


def _generate(llm):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_dbo_one_device_with_a_cut_prefill(tmp_path):
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    want = _generate(LLM(model, kv_cache_memory="64MiB"))
    # An 11-token budget cuts the 37-token prompt into chunks, each split across the micro-batches.
    llm = LLM(model, kv_cache_memory="64MiB", max_num_batched_tokens=11, **DBO)
    assert _generate(llm) == want
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert runner.num_dbo_steps > 0
    assert_pool_full(llm)


def _check_on_equals_off(model, trace_dir, world, **parallel):
    want = _generate(LLM(model, kv_cache_memory="64MiB"))
    llm = LLM(model, kv_cache_memory="64MiB", trace_dir=str(trace_dir), **parallel, **DBO)
    try:
        assert _generate(llm) == want
        assert_pool_full(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
    _assert_workers_split(trace_dir, world)


@pytest.mark.distributed
def test_dbo_tp2_dense_equals_off(tmp_path):
    _check_on_equals_off(make_tiny_checkpoint("llama", tmp_path / "llama"), tmp_path / "t", 2,
                         tensor_parallel_size=2)


@pytest.mark.distributed
def test_dbo_moe_dp2_ep_equals_off(tmp_path):
    _check_on_equals_off(make_tiny_checkpoint("qwen3_moe", tmp_path / "moe"), tmp_path / "t", 2,
                         data_parallel_size=2, enable_expert_parallel=True)


def _assert_workers_split(trace_dir, world):
    """Every rank ran some steps as two micro-batches, and all ranks the same number."""
    import json
    import os

    counts = []
    for rank in range(world):
        (name,) = [f for f in os.listdir(trace_dir) if f.startswith(f"braid-trace-worker-{rank}-")]
        events = json.load(open(os.path.join(trace_dir, name)))["traceEvents"]
        counts.append(sum(e.get("name") == "dbo" for e in events))
    assert counts[0] > 0 and len(set(counts)) == 1, counts


def test_dbo_flags_are_checked(tmp_path):
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match="--dbo-policy auto is not implemented yet"):
        EngineArgs(model=model, enable_dbo=True, dbo_policy="auto").create_engine_config()
    with pytest.raises(ValueError, match="--dbo-decode-token-threshold must be >= 2"):
        EngineArgs(model=model, enable_dbo=True, dbo_decode_token_threshold=1).create_engine_config()
    with pytest.raises(ValueError, match="--enable-dbo with --pipeline-parallel-size"):
        EngineArgs(model=model, enable_dbo=True, pipeline_parallel_size=2).create_engine_config()
