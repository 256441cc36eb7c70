"""`braid serve` through the official openai client, on a tiny checkpoint (fast to start)."""
import subprocess
import sys

import httpx
import openai
import pytest

from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_checkpoints import make_tiny_checkpoint

MODEL = "tiny"
MAX_MODEL_LEN = 256
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Hello world! How are you today?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = RemoteServer(checkpoint, "--served-model-name", MODEL, "other-name", "--max-model-len", str(MAX_MODEL_LEN),
                       "--device", "cpu", "--dtype", "float32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _complete(client, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("temperature", 0)
    return client.completions.create(**kw)


def _chat(client, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(**kw)


def _tokenize(server, **body) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_models_lists_the_served_names(client):
    assert [m.id for m in client.models.list().data] == [MODEL, "other-name"]
    # Every served name answers.
    assert _complete(client, model="other-name", max_tokens=2).model == "other-name"


def test_completion_shape_and_usage(server, client):
    r = _complete(client, max_tokens=12, extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.created > 0 and r.model == MODEL
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    n_prompt = len(_tokenize(server, prompt=PROMPT))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == n_prompt + 12


def test_completion_stream_reassembles_to_greedy_text(client):
    full = _complete(client, max_tokens=24)
    chunks = list(_complete(client, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    # include_usage: one last chunk with usage and no choices; the others carry usage null.
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_and_its_stream_agree(server, client):
    full = _chat(client, max_tokens=20)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    n_prompt = len(_tokenize(server, messages=MESSAGES))
    assert full.usage.prompt_tokens == n_prompt
    assert full.usage.completion_tokens == 20 or full.choices[0].finish_reason == "stop"

    chunks = list(_chat(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage == full.usage


def test_max_completion_tokens_and_default_fills_the_context(server, client):
    r = _chat(client, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    # No max_tokens in chat: up to the end of the context.
    r = _chat(client, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == MAX_MODEL_LEN


def test_completion_logprobs(client):
    r = _complete(client, max_tokens=6, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    # (Each token decodes alone, so a character split across byte tokens shows as U+FFFD there.)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_chat_logprobs(client):
    r = _chat(client, max_tokens=5, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    # Streamed logprobs cover the same tokens.
    chunks = list(_chat(client, max_tokens=5, logprobs=True, top_logprobs=2, stream=True,
                        extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_stop_strings(client):
    greedy = _complete(client, max_tokens=32, extra_body={"ignore_eos": True}).choices[0].text
    # A stop string from the middle of the greedy text, made of plain characters.
    start = next(i for i in range(4, len(greedy) - 2) if greedy[i:i + 2].isalnum() and greedy[i:i + 2].isascii())
    stop = greedy[start:start + 2]
    expected = greedy[:greedy.index(stop)]
    r = _complete(client, max_tokens=32, stop=[stop, "never-seen-stop"])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    chunks = list(_complete(client, max_tokens=32, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    r = _complete(client, max_tokens=32, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == expected + stop


def test_n_samples_and_seed_reproducibility(client):
    kw = dict(max_tokens=10, temperature=1.0, seed=1234, extra_body={"ignore_eos": True})
    a = _complete(client, n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert a.usage.completion_tokens == 30
    b = _complete(client, n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) > 1  # the samples differ from each other
    others = {_complete(client, **{**kw, "seed": s}).choices[0].text for s in range(5)}
    assert len(others) > 1
    # Streamed n > 1: each index reassembles to its non-streamed text.
    texts = {}
    for c in _complete(client, n=3, stream=True, **kw):
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(3)] == [c.text for c in a.choices]
    chat = _chat(client, n=2, **kw)
    assert [c.index for c in chat.choices] == [0, 1]


def test_echo(server, client):
    r = _complete(client, max_tokens=4, echo=True, logprobs=1, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.text.startswith(PROMPT)
    plain = _complete(client, max_tokens=4, extra_body={"ignore_eos": True}).choices[0].text
    assert choice.text == PROMPT + plain
    n_prompt = len(_tokenize(server, prompt=PROMPT))
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    streamed = "".join(c.choices[0].text for c in _complete(client, max_tokens=4, echo=True, stream=True,
                                                             extra_body={"ignore_eos": True}))
    assert streamed == choice.text
    # A token-id prompt is echoed as its text (decoded only for echo).
    ids = _tokenize(server, prompt=PROMPT)
    by_ids = _complete(client, prompt=ids, max_tokens=4, echo=True, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == choice.text


def test_echo_with_max_tokens_zero_scores_the_prompt(server, client):
    """vLLM's echo-only scoring: the prompt and its logprobs, nothing generated."""
    scored = _complete(client, max_tokens=0, echo=True, logprobs=2)
    generated = _complete(client, max_tokens=4, echo=True, logprobs=2, extra_body={"ignore_eos": True})
    n_prompt = len(_tokenize(server, prompt=PROMPT))
    (choice,) = scored.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert scored.usage.prompt_tokens == n_prompt and scored.usage.completion_tokens == 0
    assert choice.logprobs.tokens == generated.choices[0].logprobs.tokens[:n_prompt]
    assert choice.logprobs.token_logprobs == generated.choices[0].logprobs.token_logprobs[:n_prompt]
    chunks = list(_complete(client, max_tokens=0, echo=True, logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == choice.logprobs.tokens
    with pytest.raises(openai.BadRequestError):
        _complete(client, max_tokens=0)  # without echo there is nothing to return


def test_prompt_logprobs(server, client):
    ids = _tokenize(server, prompt=PROMPT)
    echo = _complete(client, max_tokens=1, echo=True, logprobs=1).choices[0].logprobs
    r = _complete(client, max_tokens=2, extra_body={"prompt_logprobs": 2})
    scored = r.choices[0].model_extra["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    for i, (tid, entry) in enumerate(zip(ids[1:], scored[1:]), start=1):
        entry = {int(k): v for k, v in entry.items()}
        assert tid in entry and entry[tid]["logprob"] == pytest.approx(echo.token_logprobs[i])
        assert sorted(v["rank"] for v in entry.values() if v["rank"] <= 2) == [1, 2] and len(entry) <= 3
        best = next(v for v in entry.values() if v["rank"] == 1)
        assert best["logprob"] == pytest.approx(max(v["logprob"] for v in entry.values()))
    chat = _chat(client, max_tokens=2, extra_body={"prompt_logprobs": 0})
    chat_scored = chat.model_extra["prompt_logprobs"]
    assert len(chat_scored) == chat.usage.prompt_tokens and chat_scored[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in chat_scored[1:])


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, client):
    ids = _tokenize(server, prompt=PROMPT)
    r = _complete(client, max_tokens=6, extra_body={"truncate_prompt_tokens": 3})
    assert r.usage.prompt_tokens == 3
    assert r.choices[0].text == _complete(client, prompt=ids[-3:], max_tokens=6).choices[0].text
    # Truncated token ids echo the kept tokens' text.
    echoed = _complete(client, prompt=ids, max_tokens=1, echo=True, extra_body={"truncate_prompt_tokens": 3})
    assert echoed.choices[0].text == _complete(client, prompt=ids[-3:], max_tokens=1, echo=True).choices[0].text
    assert echoed.usage.prompt_tokens == 3
    chat = _chat(client, max_tokens=6, extra_body={"truncate_prompt_tokens": 4})
    assert chat.usage.prompt_tokens == 4
    chat_ids = _tokenize(server, messages=MESSAGES)
    assert chat.choices[0].message.content == _complete(client, prompt=chat_ids[-4:], max_tokens=6).choices[0].text
    # -1: as much as the context holds (this prompt is shorter: unchanged).
    assert _complete(client, max_tokens=2, extra_body={"truncate_prompt_tokens": -1}).usage.prompt_tokens == len(ids)


def test_continue_final_message_matches_transformers(server, client, checkpoint):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Write a story."}, {"role": "assistant", "content": "Once upon a"}]
    hf = AutoTokenizer.from_pretrained(checkpoint)
    expected = hf.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                      tokenize=False)
    ids = _tokenize(server, messages=messages, add_generation_prompt=False, continue_final_message=True)
    assert ids == hf.encode(expected, add_special_tokens=False)
    assert hf.decode(ids).endswith("Once upon a")  # the turn is left open
    r = _chat(client, messages=messages, max_tokens=6,
              extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == _complete(client, prompt=ids, max_tokens=6).choices[0].text


def test_return_tokens_as_token_ids(server, client):
    r = _complete(client, max_tokens=5, logprobs=2, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert all(t.startswith("token_id:") for t in lp.tokens)
    detok = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert detok == r.choices[0].text
    assert all(all(k.startswith("token_id:") for k in top) for top in lp.top_logprobs)
    chat = _chat(client, max_tokens=3, logprobs=True, top_logprobs=1,
                 extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert all(e.token.startswith("token_id:") and e.top_logprobs[0].token.startswith("token_id:")
               for e in chat.choices[0].logprobs.content)


def test_prompt_forms(server, client):
    ids = _tokenize(server, prompt=PROMPT)
    text = _complete(client, max_tokens=8).choices[0].text
    assert _complete(client, prompt=ids, max_tokens=8).choices[0].text == text
    r = _complete(client, prompt=[PROMPT, "Hello world!"], max_tokens=8, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == text  # greedy: both samples alike
    r2 = _complete(client, prompt=[ids, ids], max_tokens=8)
    assert [c.text for c in r2.choices] == [text, text]


def test_tokenize_round_trip(server):
    text = "Paged attention stores keys and values."
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": text})
    body = r.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    r = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}


def test_health_version_metrics(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    before = server.wait_idle()["braid:generation_tokens_total"]
    assert _complete(client, max_tokens=3).usage.completion_tokens == 3
    m = server.wait_idle()
    assert m["braid:kv_cache_usage_perc"] == 0 and m["braid:num_requests_running"] == 0
    assert m["braid:generation_tokens_total"] == before + 3
    for phase in ("queue", "prefill", "decode", "inference"):  # every finished request observes each
        assert m[f"braid:request_{phase}_time_seconds_count"] == m["braid:e2e_request_latency_seconds_count"] > 0
    assert m["braid:request_prompt_tokens_count"] == m["braid:e2e_request_latency_seconds_count"]


def test_registering_serve_keeps_the_cli_light():
    """cli.py registers `serve` for every command: that must not import the server stack."""
    code = ("import argparse, sys; from braid.entrypoints.api_server import add_serve_parser; "
            "add_serve_parser(argparse.ArgumentParser().add_subparsers()); "
            "heavy = [m for m in ('fastapi', 'uvicorn', 'pydantic', 'zmq') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
