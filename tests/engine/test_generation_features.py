"""Engine-level behaviour of sampling features: seeds, n, stop strings and ids,
min/max tokens, timing metrics, chat and text prompts."""
import pytest

from braid import LLM, SamplingParams
from tests.engine.conftest import assert_pool_full


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, max_model_len=256, kv_cache_memory="128MiB")


def _text(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def test_seeded_sampling_reproduces_alone_and_in_a_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    a = llm.generate("Tell me a story", params, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate("Tell me a story", params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b
    mixed = [SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)] * 3 + [params]
    batch = llm.generate(["x y z", "Once", "Tell me a joke", "Tell me a story"], mixed, use_tqdm=False)
    assert batch[3].outputs[0].token_ids == a
    other = llm.generate("Tell me a story", SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=16,
                                                          ignore_eos=True), use_tqdm=False)
    assert other[0].outputs[0].token_ids != a
    assert_pool_full(llm)


def test_n_samples(llm):
    out = llm.generate("The weather today", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12,
                                                           ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = llm.generate("The weather today", SamplingParams(n=2, temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert_pool_full(llm)


def test_stop_string_cuts_the_text(llm):
    full = _text(llm, "1, 2, 3, 4, 5,", temperature=0, max_tokens=20, ignore_eos=True)
    assert " 7" in full.text
    cut = _text(llm, "1, 2, 3, 4, 5,", temperature=0, max_tokens=20, ignore_eos=True, stop=[" 7"])
    assert cut.finish_reason == "stop" and cut.stop_reason == " 7"
    assert cut.text == full.text[: full.text.index(" 7")]
    kept = _text(llm, "1, 2, 3, 4, 5,", temperature=0, max_tokens=20, ignore_eos=True, stop=[" 7"],
                 include_stop_str_in_output=True)
    assert kept.text == full.text[: full.text.index(" 7") + 2]
    assert_pool_full(llm)


def test_min_tokens_holds_stop_strings_back(llm):
    """vLLM's rule: a stop string counts only in text added after the first min_tokens tokens."""
    full = _text(llm, "1, 2, 3, 4, 5,", temperature=0, max_tokens=20, ignore_eos=True)
    early = _text(llm, "1, 2, 3, 4, 5,", temperature=0, max_tokens=20, ignore_eos=True, stop=[","])
    assert early.finish_reason == "stop" and len(early.token_ids) < 6
    held = _text(llm, "1, 2, 3, 4, 5,", temperature=0, max_tokens=20, ignore_eos=True, stop=[","], min_tokens=6)
    assert held.finish_reason == "stop" and len(held.token_ids) > 6
    assert held.token_ids == full.token_ids[:len(held.token_ids)]
    assert full.text.startswith(held.text) and "," in held.text  # the earlier commas did not stop it
    assert_pool_full(llm)


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    full = _text(llm, "1, 2, 3, 4, 5,", temperature=0, max_tokens=10, ignore_eos=True)
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    out = _text(llm, "1, 2, 3, 4, 5,", temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id])
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    longer = _text(llm, "1, 2, 3, 4, 5,", temperature=0, max_tokens=10, ignore_eos=True,
                   stop_token_ids=[stop_id], min_tokens=first + 2)
    assert len(longer.token_ids) > first + 1
    assert full.finish_reason == "length" and len(full.token_ids) == 10


def test_eos_stops_unless_ignored(llm):
    chat = [{"role": "user", "content": "Say hi."}]
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    eos = set(llm.llm_engine.input_processor.eos_token_ids)
    assert out.finish_reason == "stop" and out.token_ids[-1] in eos
    assert "<|im_end|>" not in out.text
    ignored = llm.chat(chat, SamplingParams(temperature=0, max_tokens=len(out.token_ids) + 5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == len(out.token_ids) + 5


def test_a_request_queued_behind_a_full_batch_reports_its_queue_time(smollm2_path):
    """With room for one sequence, the second request waits in the core's queue until the first
    has finished: its queue time covers the first's whole inference time."""
    one_at_a_time = LLM(smollm2_path, max_model_len=128, kv_cache_memory="32MiB", max_num_seqs=1)
    first, second = (o.metrics for o in one_at_a_time.generate(
        ["Hello", "Goodbye"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False))
    for m in (first, second):
        assert m.queued_ts <= m.scheduled_ts <= m.first_token_ts < m.last_token_ts
    assert second.scheduled_ts > first.last_token_ts
    assert second.queue_time > first.inference_time > first.decode_time > 0


def test_metrics_and_text_round_trip(llm):
    out = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    assert m.time_to_first_token > 0 and m.time_per_output_token > 0 and m.e2e_latency >= m.time_to_first_token
    tok = llm.get_tokenizer()
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    assert out.prompt == "Hello, my name is" and out.prompt_token_ids == tok.encode("Hello, my name is")


def test_max_tokens_none_runs_to_the_context_limit(llm):
    out = llm.generate(list(range(1, 240)), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 256 - 239 and out.finish_reason == "length"


def test_chat_takes_what_the_server_takes(llm):
    """LLM.chat: text content parts, continue_final_message, tools and template kwargs, rendered
    as transformers renders them (the same code as the server's chat endpoint)."""
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = [{"role": "user", "content": "Hi there\nHow are you?"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}, {"type": "text", "text": "How are you?"}]}]
    a, b = llm.chat(plain, greedy, use_tqdm=False)[0], llm.chat(parts, greedy, use_tqdm=False)[0]
    assert a.prompt_token_ids == b.prompt_token_ids and a.outputs[0].token_ids == b.outputs[0].token_ids
    with pytest.raises(ValueError, match="text content parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], greedy)

    story = [{"role": "user", "content": "Tell a story."}, {"role": "assistant", "content": "Once upon a"}]
    out = llm.chat(story, greedy, add_generation_prompt=False, continue_final_message=True, use_tqdm=False)[0]
    expected = tok.apply_chat_template(story, add_generation_prompt=False, continue_final_message=True, tokenize=False)
    assert out.prompt == expected and expected.rstrip().endswith("Once upon a")
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(story, greedy, continue_final_message=True)  # with add_generation_prompt (default True)

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object", "properties": {}}}}]
    template = "{% for t in tools %}[{{ t['function']['name'] }}] {% endfor %}{{ messages[-1]['content'] }}"
    with_tools = llm.chat(plain, greedy, tools=tools, chat_template=template, use_tqdm=False)[0]
    assert with_tools.prompt == "[get_weather] " + plain[0]["content"]
    assert with_tools.prompt == tok.apply_chat_template(plain, tools=tools, chat_template=template, tokenize=False)
    assert_pool_full(llm)


def test_use_tqdm_may_be_the_progress_bar_class(llm):
    """As in vLLM: use_tqdm=<a tqdm-like class> is used for the bar."""
    made = []

    class Bar:
        def __init__(self, **kwargs):
            self.total, self.done, self.closed = kwargs["total"], 0, False
            made.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            self.closed = True

    llm.generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=Bar)
    assert [(b.total, b.done, b.closed) for b in made] == [(2, 2, True)]
