"""Bad requests get the right 4xx in OpenAI's error shape, and the server keeps serving."""
import json
import signal
import time

import httpx
import openai
import pytest

from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_checkpoints import make_tiny_checkpoint

KEY = "sk-test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 128
BODY_LIMIT = 64 * 1024
V1_ROUTES = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = RemoteServer(checkpoint, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-request-body-bytes", str(BODY_LIMIT), "--device", "cpu", api_key=KEY)
    yield srv
    srv.stop()


def _post(server, path, body, headers=None, **kw):
    headers = {**server.headers, **(headers or {})}
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=30, **kw)
    return httpx.post(server.url + path, content=body, headers={"content-type": "application/json", **headers},
                      timeout=30, **kw)


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def _assert_serving(server):
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


COMPLETION_CASES = {
    "negative max_tokens": ({"max_tokens": -1}, "max_tokens"),
    "zero max_tokens": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens wrong type": ({"max_tokens": "many"}, "max_tokens"),
    "temperature wrong type": ({"temperature": "hot"}, "temperature"),
    "negative temperature": ({"temperature": -0.5}, "temperature"),
    "top_p out of range": ({"top_p": 1.5}, "top_p"),
    "top_k out of range": ({"top_k": -3}, "top_k"),
    "n zero": ({"n": 0}, "n"),
    "logprobs too many": ({"logprobs": 1000}, "logprobs"),
    "prompt wrong type": ({"prompt": 5}, "prompt"),
    "prompt empty string": ({"prompt": ""}, "prompt"),
    "prompt empty list": ({"prompt": []}, "prompt"),
    "prompt token out of vocab": ({"prompt": [1, 2, 10**6]}, "prompt"),
    "negative token id": ({"prompt": [-1]}, "prompt"),
    "stop wrong type": ({"stop": 7}, "stop"),
    "stop_token_ids out of vocab": ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, "stream_options"),
    "continuous usage stats": ({"stream": True, "stream_options": {"include_usage": True,
                                                                   "continuous_usage_stats": True}}, "stream_options"),
    "suffix": ({"suffix": "!"}, "suffix"),
    "logit_bias": ({"logit_bias": {"5": 10}}, "logit_bias"),
    # vLLM extensions braid lacks: never silently ignored
    "guided_choice": ({"guided_choice": ["yes", "no"]}, "guided_choice"),
    "guided_json": ({"guided_json": {"type": "object"}}, "guided_json"),
    "guided_json empty": ({"guided_json": {}}, "guided_json"),  # vLLM would still force JSON
    "spaces_between_special_tokens off": ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
    "structured_outputs": ({"structured_outputs": {"regex": "[0-9]+"}}, "structured_outputs"),
    "allowed_token_ids": ({"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
    "bad_words": ({"bad_words": ["the"]}, "bad_words"),
    "beam search": ({"use_beam_search": True}, "use_beam_search"),
    "priority": ({"priority": 3}, "priority"),
    "response_format json": ({"response_format": {"type": "json_object"}}, "response_format"),
    "truncate_prompt_tokens zero": ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    "echo with negative max_tokens": ({"echo": True, "max_tokens": -1}, "max_tokens"),
    "prompt + max_tokens over the context": ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    "prompt longer than the context": ({"prompt": "hello " * 400}, "prompt"),
    "min_tokens over max_tokens": ({"min_tokens": 10, "max_tokens": 2}, "min_tokens"),
}


@pytest.mark.parametrize("case", list(COMPLETION_CASES))
def test_bad_completion_requests_are_400(server, case):
    fields, param = COMPLETION_CASES[case]
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields}
    _assert_error(_post(server, "/v1/completions", body), 400, param)
    # The same error on a streamed request comes before the stream starts.
    if "stream_options" not in fields:
        _assert_error(_post(server, "/v1/completions", {**body, "stream": True}), 400, param)


CHAT_CASES = {
    "messages wrong type": ({"messages": "hi"}, "messages"),
    "messages empty": ({"messages": []}, "messages"),
    "message without role": ({"messages": [{"content": "hi"}]}, None),
    "image content": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                      "messages.0.content"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "top_logprobs too many": ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    "response_format json": ({"response_format": {"type": "json_object"}}, "response_format"),
    "tools with tool calls": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    "tool_choice required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "continue_final_message with a generation prompt": ({"continue_final_message": True}, "continue_final_message"),
    "chat echo": ({"echo": True}, "echo"),
    "guided_regex": ({"guided_regex": "[a-z]+"}, "guided_regex"),
    "per-request chat_template": ({"chat_template": "{{ 'X' }}"}, "chat_template"),
    "prompt_logprobs streamed": ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    "negative max_completion_tokens": ({"max_completion_tokens": -5}, "max_completion_tokens"),
    "max_tokens over the context": ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    "frequency_penalty out of range": ({"frequency_penalty": 3}, "frequency_penalty"),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_bad_chat_requests_are_400(server, case):
    fields, param = CHAT_CASES[case]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    _assert_error(_post(server, "/v1/chat/completions", body), 400, param)


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "use_beam_search": False, "priority": 0,
            "bad_words": [], "guided_json": None, "response_format": {"type": "text"},
            "spaces_between_special_tokens": True, "documents": []}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw", [b"{\"model\": ", b"not json", b"", b"[1, 2]", b"\"a string\"", b"\xff\xfe"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_malformed_json_is_400(server, path, raw):
    _assert_error(_post(server, path, raw), 400)


def test_unknown_model_is_404(server):
    for path, body in [("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
        error = _assert_error(_post(server, path, {**body, "model": "gpt-4"}), 404, "model")
        assert "gpt-4" in error["message"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("method,path", V1_ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {KEY}", KEY, "Bearer  x"])
def test_api_key_is_required_on_every_v1_route(server, method, path, auth):
    headers = {} if auth is None else {"Authorization": auth}
    body = {"model": MODEL, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.request(method, server.url + path, headers=headers, json=body if method == "POST" else None)
    error = _assert_error(r, 401)
    assert error["code"] == "invalid_api_key" and KEY not in r.text


def test_api_key_through_the_client(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == [MODEL]


def test_routes_outside_v1_need_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.post(server.url + "/tokenize", json={"prompt": "hi"}).status_code == 200
    _assert_error(httpx.get(server.url + "/no/such/route"), 404)


def test_oversized_body_is_413(server):
    big = {"model": MODEL, "prompt": "x" * (BODY_LIMIT + 10), "max_tokens": 2}
    _assert_error(_post(server, "/v1/completions", big), 413)
    # Far over the limit, the client is still sending when the server answers: the server
    # reads the rest before closing, or the connection is reset and the 413 lost (now and then).
    huge = json.dumps({**big, "prompt": "x" * (64 * BODY_LIMIT)}).encode()
    for _ in range(20):
        _assert_error(_post(server, "/v1/completions", huge), 413)
    # Without Content-Length (chunked upload), the cap counts the bytes as they arrive.
    data = json.dumps(big).encode()

    def chunks():
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=30,
                   headers={**server.headers, "content-type": "application/json"})
    _assert_error(r, 413)
    _assert_serving(server)


def _raw_post_headers(server, extra: str) -> bytes:
    """Send only a request's headers (no body) and return the first response bytes."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Authorization: Bearer {KEY}\r\n{extra}\r\n").encode())
        return sock.recv(4096)  # a hang fails here, on the 30 s socket timeout


def test_oversized_body_that_never_arrives_is_still_answered(server):
    """The guard reads the rest of a rejected body, but not forever, and not when the client
    waits for '100 Continue' first (that would invite the upload)."""
    answer = _raw_post_headers(server, f"Content-Length: {100 * BODY_LIMIT}\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    answer = _raw_post_headers(server, f"Content-Length: {100 * BODY_LIMIT}\r\nExpect: 100-continue\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]  # not "100 Continue"
    _assert_serving(server)


def test_detokenize_bad_tokens_is_400(server):
    _assert_error(httpx.post(server.url + "/detokenize", json={"tokens": [10**7]}), 400, "tokens")
    _assert_error(httpx.post(server.url + "/detokenize", json={"tokens": "abc"}), 400, "tokens")
    _assert_error(httpx.post(server.url + "/tokenize", json={}), 400)


def test_server_keeps_serving_after_every_error(server):
    m = server.wait_idle()
    assert m["braid:kv_cache_usage_perc"] == 0 and m["braid:num_requests_running"] == 0
    _assert_serving(server)
    assert httpx.get(server.url + "/health").status_code == 200


def test_no_chat_template_is_400(checkpoint, tmp_path):
    """A tokenizer without a chat template: chat is a 400, not a 500 (checked on the serving class)."""
    from transformers import AutoTokenizer

    from braid.entrypoints.openai_serving import APIError
    from braid.entrypoints.protocol import ChatMessage
    from braid.entrypoints.serving_chat import OpenAIServingChat

    class FakeEngine:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        max_model_len = MAX_MODEL_LEN

    FakeEngine.tokenizer.chat_template = None
    chat = OpenAIServingChat(FakeEngine(), [MODEL])
    with pytest.raises(APIError) as e:
        chat.render([ChatMessage(role="user", content="hi")])
    assert e.value.status == 400 and "chat template" in e.value.message


def test_dead_engine_is_503_and_sigint_still_exits_cleanly(checkpoint):
    srv = RemoteServer(checkpoint, "--max-model-len", str(MAX_MODEL_LEN), "--device", "cpu")
    try:
        srv.engine_core().kill()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        _assert_error(httpx.get(srv.url + "/health"), 503)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert _assert_error(r, 503)["type"] == "service_unavailable"
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 200
    finally:
        srv.stop(signal.SIGINT)
