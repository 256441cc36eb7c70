"""Dual-batch overlap on CPU: DBO on equals DBO off token for token — one device, dense
TP=2 (the all-reduces are the hand-over points), MoE with DP=2 x EP (the all-to-alls
are), prefill and decode steps, and a prefill chunk cut in the middle (its second part
continues in the second micro-batch). A DP replica that runs a dummy batch votes no,
so that step runs whole everywhere. The auto policy measures its table at start-up (in
lockstep on every DP rank, which then hold the same table) and splits only where the
table says splitting pays."""
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


def test_dbo_auto_policy_follows_its_table(tmp_path):
    from braid.worker.dbo_auto import DboTable

    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    want = _generate(LLM(model, kv_cache_memory="64MiB"))
    llm = LLM(model, kv_cache_memory="64MiB", max_num_seqs=8, max_num_batched_tokens=32, dbo_policy="auto", **DBO)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    table = runner.dbo_table
    # Measured at start-up: decode 4 (3 rounded up to a power of two) and 8; prefill 8, 16, 32.
    assert [r[0] for r in table.decode] == [4, 8] and [r[0] for r in table.prefill] == [8, 16, 32]
    assert all(w > 0 and sp > 0 for _, w, sp in table.decode + table.prefill)
    for always in (True, False):
        before = runner.num_dbo_steps
        runner.dbo_table = DboTable(decode=[(3, 1.0, 0.5 if always else 2.0)],
                                    prefill=[(8, 1.0, 0.5 if always else 2.0)])
        assert _generate(llm) == want
        assert (runner.num_dbo_steps > before) == always
    assert_pool_full(llm)


def test_auto_calibration_steps_look_like_real_ones(tmp_path, monkeypatch):
    """Start-up dummy steps carry varied token ids (identical ids would send every MoE token to
    the same experts) and decode over real contexts, not one cached token."""
    from braid.worker.model_runner import ModelRunner

    seen = []
    real = ModelRunner._compute

    def spy(self, input_ids, positions, *args, **kwargs):
        seen.append((input_ids.numel(), input_ids.unique().numel(), positions.tolist()))
        return real(self, input_ids, positions, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "_compute", spy)
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    LLM(model, kv_cache_memory="64MiB", max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128,
        dbo_policy="auto", **DBO)
    decode = [(n, distinct, pos) for n, distinct, pos in seen if len(set(pos)) == 1 and n > 1]
    assert decode and all(pos[0] == 126 for _, _, pos in decode)  # contexts of min(512, 128 - 1) tokens
    assert all(distinct > 1 for n, distinct, _ in seen if n >= 4)


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


@pytest.mark.distributed
@pytest.mark.parametrize("arch,parallel", [
    ("qwen3_moe", dict(data_parallel_size=2, enable_expert_parallel=True)),
    # The TP ranks of one replica must split the same steps: one table there too.
    ("llama", dict(tensor_parallel_size=2)),
], ids=["moe-dp2-ep", "dense-tp2"])
def test_dbo_auto_one_table_on_every_rank(tmp_path, arch, parallel):
    import json
    import os

    model = make_tiny_checkpoint(arch, tmp_path / arch)
    want = _generate(LLM(model, kv_cache_memory="64MiB"))
    trace_dir = tmp_path / "t"
    llm = LLM(model, kv_cache_memory="64MiB", trace_dir=str(trace_dir), max_num_seqs=8, max_num_batched_tokens=32,
              dbo_policy="auto", **parallel, **DBO)
    try:
        assert _generate(llm) == want
        assert_pool_full(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
    tables = []
    for rank in range(2):
        (name,) = [f for f in os.listdir(trace_dir) if f.startswith(f"braid-trace-worker-{rank}-")]
        events = json.load(open(os.path.join(trace_dir, name)))["traceEvents"]
        (span,) = [e for e in events if e.get("name") == "dbo_calibration"]
        tables.append((span["args"]["decode"], span["args"]["prefill"]))
    assert tables[0] == tables[1] and len(tables[0][0]) == 2


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
    with pytest.raises(ValueError, match="--dbo-policy must be threshold or auto"):
        EngineArgs(model=model, enable_dbo=True, dbo_policy="always").create_engine_config()
    with pytest.raises(ValueError, match="--dbo-decode-token-threshold must be >= 2"):
        EngineArgs(model=model, enable_dbo=True, dbo_decode_token_threshold=1).create_engine_config()
    with pytest.raises(ValueError, match="--enable-dbo with --pipeline-parallel-size"):
        EngineArgs(model=model, enable_dbo=True, pipeline_parallel_size=2).create_engine_config()
