"""GPU: the mixture-of-experts models (fused Triton experts, MLA through the Triton
paged attention with a 48-wide latent entry) give HF transformers' greedy tokens on
the same tiny random weights, fp32, eager and with CUDA graphs."""
import gc

import pytest
import torch

from braid import LLM, SamplingParams
from tests.tiny_checkpoints import make_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[1, 17, 250, 33, 99, 5, 300, 42, 7, 120, 64, 201, 88, 19, 3], [1, 45, 9, 310, 27], [3, 4, 5, 6]]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_moe_models_match_hf_on_gpu(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(arch, tmp_path / arch, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    want = []
    with torch.no_grad():
        for p in PROMPTS:
            out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    del hf
    for eager in (True, False):
        llm = LLM(path, dtype="float32", enforce_eager=eager, max_model_len=256, kv_cache_memory="512MiB",
                  max_num_seqs=8)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want, f"enforce_eager={eager}"
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _greedy(path, prompts, params, **kw) -> list[list[int]]:
    """Tokens of one engine run (fp32, small pool), its workers stopped and memory freed after."""
    llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory="512MiB", **kw)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("backend,eager,sched", [
    ("allgather_reducescatter", False, {}), ("allgather_reducescatter", True, {}), ("all_to_all", True, {}),
    ("allgather_reducescatter", False, {"async_scheduling": True, "num_scheduler_steps": 4}),
], ids=["graphs", "eager", "all-to-all", "graphs-async-ms4"])
def test_dp2_expert_parallel_on_gpus_matches_one_gpu(tmp_path, backend, eager, sched):
    """DP=2 x EP over NCCL (the all-gather form replays CUDA graphs, an idle replica replaying
    padding at the other's size, also through multi-step passes with async scheduling) gives
    one GPU's greedy tokens; skewed lengths make one replica idle for most steps."""
    path = make_tiny_checkpoint("qwen3_moe", tmp_path / "moe", seed=3)
    params = [SamplingParams(temperature=0, max_tokens=24 if i % 2 == 0 else 4, ignore_eos=True)
              for i in range(len(PROMPTS))]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    want = _greedy(path, prompts, params, max_num_seqs=8, enforce_eager=True)
    assert _greedy(path, prompts, params, max_num_seqs=8, enforce_eager=eager, data_parallel_size=2,
                   enable_expert_parallel=True, all2all_backend=backend, **sched) == want


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_dbo_split_decode_graphs_on_two_gpus(tmp_path):
    """DBO with CUDA graphs, DP=2 x EP over NCCL: split decode steps replay graphs captured
    from the two micro-batch threads (collectives on the comm stream), tokens equal DBO off."""
    import json
    import os

    path = make_tiny_checkpoint("qwen3_moe", tmp_path / "moe", seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS * 3]
    dp_ep = dict(max_num_seqs=16, data_parallel_size=2, enable_expert_parallel=True)
    want = _greedy(path, prompts, params, **dp_ep)
    trace_dir = tmp_path / "t"
    assert _greedy(path, prompts, params, enable_dbo=True, dbo_decode_token_threshold=2,
                   dbo_prefill_token_threshold=4, trace_dir=str(trace_dir), **dp_ep) == want
    for rank in range(2):
        (name,) = [f for f in os.listdir(trace_dir) if f.startswith(f"braid-trace-worker-{rank}-")]
        events = json.load(open(os.path.join(trace_dir, name)))["traceEvents"]
        launches = [e.get("args", {}) for e in events if e.get("name") == "launch"]
        assert any(a.get("dbo") and a.get("cuda_graph") for a in launches), rank   # split graph replays
        assert any(a.get("dbo") and not a.get("cuda_graph") for a in launches), rank  # split prefill, eager


def test_dbo_split_decode_graph_on_one_gpu(tmp_path):
    """One GPU (no collectives, so no hand-overs): the split decode graphs replay and give
    DBO off's tokens."""
    path = make_tiny_checkpoint("llama", tmp_path / "llama", seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS * 3]
    outs = []
    for dbo in (False, True):
        llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory="512MiB", max_num_seqs=16,
                  enable_dbo=dbo, dbo_decode_token_threshold=2, dbo_prefill_token_threshold=4)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        runner = llm.llm_engine.engine_core.executor.worker.model_runner
        assert bool(runner.cuda_graphs.split_graphs) == dbo
        assert (runner.cuda_graphs.num_split_replays > 0) == dbo
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert outs[0] == outs[1]
