"""SmolLM2-135M-Instruct from the shipped GGUF: braid's greedy tokens and prompt
logprobs against HF transformers loading the same file (transformers dequantizes
and un-permutes the weights with its own code)."""
import pytest
import torch

from braid import LLM, SamplingParams
from braid.bench.backend_agreement import PROMPTS
from tests.engine.conftest import assert_pool_full
from tests.engine.hf_reference import hf_greedy, hf_prompt_logprobs, load_hf_model

# Six varied raw prompts shared with the GPU agreement check.
RAW_PROMPTS = PROMPTS[:6]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "List three uses of a paperclip. " * 6}],
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, max_model_len=1024, kv_cache_memory="256MiB", seed=0)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    return load_hf_model(smollm2_path)


def _prompt_ids(llm):
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in RAW_PROMPTS]
    for conv in CHAT_PROMPTS:
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ids.append(tok.encode(text, add_special_tokens=False))
    return ids


def test_greedy_tokens_equal_transformers(llm, hf):
    prompts = _prompt_ids(llm)
    assert len(prompts) >= 8 and len({len(p) for p in prompts}) > 4
    eos = set(llm.llm_engine.input_processor.eos_token_ids)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for ids, out in zip(prompts, outputs):
        expected = hf_greedy(hf, ids, NEW_TOKENS, eos)
        assert out.outputs[0].token_ids == expected, f"prompt {ids[:8]}..."
    assert_pool_full(llm)


def test_prompt_logprobs_match_transformers(llm, hf):
    prompts = _prompt_ids(llm)[:4]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for ids, out in zip(prompts, outputs):
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        got = torch.tensor([out.prompt_logprobs[t + 1][ids[t + 1]].logprob for t in range(len(ids) - 1)],
                           dtype=torch.float64)
        ref = hf_prompt_logprobs(hf, ids)
        assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
        # Each position also carries the top-2 alternatives, ranked.
        assert all(len(d) >= 2 for d in out.prompt_logprobs[1:])
    assert_pool_full(llm)


def test_sampled_logprobs_are_consistent(llm, hf):
    ids = _prompt_ids(llm)[0]
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=4, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry[token].rank == 1  # greedy picks the best
        assert max(lp.logprob for lp in entry.values()) == pytest.approx(entry[token].logprob)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))
    # The first sampled token's logprob equals HF's log-softmax at the prompt's last position.
    logits = hf(torch.tensor([ids])).logits[0, -1].double()
    ref = torch.log_softmax(logits, -1)[out.token_ids[0]].item()
    assert out.logprobs[0][out.token_ids[0]].logprob == pytest.approx(ref, abs=1e-4)
