"""DeepSeek-V2 through the engine: the KV cache holds one compressed entry per token
(the V plane is the K plane, no second copy), and greedy tokens equal HF
transformers' generate on the same tiny random weights, also after prefix hits and
with chunked prefill."""
import torch

from braid import LLM, SamplingParams
from tests.engine.conftest import assert_pool_full
from tests.tiny_checkpoints import make_tiny_checkpoint

PROMPTS = [[1, 17, 250, 33, 99, 5, 300, 42, 7, 120, 64, 201, 88, 19, 3], [1, 45, 9, 310, 27], [3, 4, 5, 6]]


def test_mla_cache_is_one_plane_and_tokens_match_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint("deepseek_v2", tmp_path / "ds", seed=3)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = []
    with torch.no_grad():
        for p in PROMPTS:
            out = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    llm = LLM(path, kv_cache_memory="8MiB", max_num_batched_tokens=8, max_model_len=64, block_size=4)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    cache = runner.kv_caches[1]
    assert cache.stride(0) == 0 and cache[0].data_ptr() == cache[1].data_ptr()  # V is K
    # 8 MiB of one-plane fp32 blocks of 4 tokens x 48 wide per layer (3 layers).
    assert llm.llm_engine.engine_core.num_blocks == 8 * 2**20 // (4 * 48 * 4 * 3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for _ in range(2):  # the second time with prefix-cache hits
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.llm_engine.last_stats.prefix_cache_hits > 0
    assert_pool_full(llm)
