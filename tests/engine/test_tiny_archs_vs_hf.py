"""Every supported architecture, from tiny random checkpoints written by transformers'
save_pretrained, through the whole engine (scheduler, paged cache, sampler): greedy
tokens and prompt logprobs equal HF transformers."""
import pytest
import torch

from braid import LLM, SamplingParams
from tests.engine.conftest import assert_pool_full
from tests.engine.hf_reference import hf_greedy, hf_prompt_logprobs, load_hf_model
from tests.tiny_checkpoints import ARCHS, make_tiny_checkpoint

PROMPTS = ["Hello world! How are", "The capital of France is", "def main():\n    print(",
           "Once upon a time there was a little engine that could, and it did. " * 3]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=list(ARCHS) + ["llama-sharded"])
def checkpoint(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    if arch == "llama-sharded":
        return make_tiny_checkpoint("llama", path, shard=True, num_hidden_layers=3)
    return make_tiny_checkpoint(arch, path)


def test_engine_equals_transformers(checkpoint):
    llm = LLM(checkpoint, max_model_len=256, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=20)
    hf = load_hf_model(checkpoint)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0),
                        use_tqdm=False)
    for ids, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, NEW_TOKENS)
        got = torch.tensor([out.prompt_logprobs[t + 1][ids[t + 1]].logprob for t in range(len(ids) - 1)],
                           dtype=torch.float64)
        assert torch.allclose(got, hf_prompt_logprobs(hf, ids), atol=1e-4, rtol=0)
    assert_pool_full(llm)
