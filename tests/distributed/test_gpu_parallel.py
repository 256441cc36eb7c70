"""GPU (NCCL): tensor, pipeline and (dense) data parallelism give the single-GPU greedy tokens, with and
without CUDA graphs (each pipeline stage replays its own graph; the later stage receives
into the graph's static inputs), with async scheduling, and TP x PP; fp32, so that the
reduction order TP changes cannot flip a token. Every worker's timeline shows its decode
steps replayed from graphs when graphs are on."""
import gc
import json
import os

import pytest
import torch

from braid import LLM, SamplingParams
from tests.engine.conftest import assert_pool_full
from tests.tiny_checkpoints import make_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.distributed,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]

CASES = {
    "tp2": dict(tensor_parallel_size=2),
    "pp2": dict(pipeline_parallel_size=2),
    "pp2-eager": dict(pipeline_parallel_size=2, enforce_eager=True),
    "pp2-async": dict(pipeline_parallel_size=2, async_scheduling=True),
    "pp2-1-in-flight": dict(pipeline_parallel_size=2, max_concurrent_batches=1),
    "tp2-async-ms4": dict(tensor_parallel_size=2, async_scheduling=True, num_scheduler_steps=4),
    "tp2xpp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2, async_scheduling=True),
    "pp4": dict(pipeline_parallel_size=4),
    "pp2-async-ms4": dict(pipeline_parallel_size=2, async_scheduling=True, num_scheduler_steps=4),
    # Interleaved multi-step passes: CUDA-graph inputs saved and restored per micro-batch.
    "pp2-ms8": dict(pipeline_parallel_size=2, num_scheduler_steps=8),
    "pp2-ms8-eager": dict(pipeline_parallel_size=2, num_scheduler_steps=8, enforce_eager=True),
    "pp4-async-ms8": dict(pipeline_parallel_size=4, async_scheduling=True, num_scheduler_steps=8),
    # Dual-batch overlap over TP all-reduces: split decode steps replay graphs captured from the
    # two micro-batch threads; split prefills run eagerly.
    "tp2-dbo": dict(tensor_parallel_size=2, enable_dbo=True, dbo_decode_token_threshold=2,
                    dbo_prefill_token_threshold=4),
    # Dense data parallelism: a replica that runs out of requests first idles (no dummy forward).
    "dp2": dict(data_parallel_size=2),
    "dp2-async-ms4": dict(data_parallel_size=2, async_scheduling=True, num_scheduler_steps=4),
}


def _generate(model, prompts, **kw):
    llm = LLM(model, dtype="float32", max_model_len=256, kv_cache_memory="1GiB", max_num_seqs=32, **kw)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
        assert_pool_full(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_hidden_layers=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 380, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(21)]
    return model, prompts, _generate(model, prompts)


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_equals_single_gpu(setup, case, tmp_path):
    model, prompts, want = setup
    kw = CASES[case]
    world = kw.get("tensor_parallel_size", 1) * kw.get("pipeline_parallel_size", 1) * kw.get("data_parallel_size", 1)
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    assert _generate(model, prompts, trace_dir=str(tmp_path), **kw) == want
    # Decode steps ran from CUDA graphs on every rank (or on none, eager).
    for rank in range(world):
        (name,) = [f for f in os.listdir(tmp_path) if f.startswith(f"braid-trace-worker-{rank}-")]
        launches = [e for e in json.load(open(tmp_path / name))["traceEvents"] if e.get("name") == "launch"]
        graphed = sum(bool((e.get("args") or {}).get("cuda_graph")) for e in launches)
        if kw.get("enforce_eager"):
            assert graphed == 0
        else:
            assert graphed > len(launches) // 2, (rank, graphed, len(launches))
