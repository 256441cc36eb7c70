"""`braid bench serve` against a fake OpenAI-compatible streaming server on 127.0.0.1.

The fake server waits TTFT_S before the first chunk and ITL_S between chunks, one token per
chunk, then sends a usage chunk and [DONE]. Token-id prompts choose misbehaviour by their first
id: id % 7 == 0 -> HTTP 500, id % 7 == 1 -> an error event after the first chunk, id % 7 == 2 ->
a stall longer than the test's --request-timeout (only when the request body asks for it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading

import pytest
from aiohttp import web

from braid.bench import serve
from braid.bench.cli import add_bench_subparsers

TTFT_S = 0.05
ITL_S = 0.02
MODEL = "fake-model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.bodies: list[dict] = []
        self.expect_auth: str | None = None
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self._started.set()
        self.loop.run_forever()

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        try:
            fut.result(5)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.expect_auth is not None and request.headers.get("Authorization") != self.expect_auth:
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        chat = request.path.endswith("/chat/completions")
        prompt = body.get("prompt")
        mode = prompt[0] % 7 if isinstance(prompt, list) else -1
        if mode == 0:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        if mode == 2 and body.get("fake_stall"):
            await asyncio.sleep(3)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj) -> None:
            await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

        n = int(body["max_tokens"])
        per_chunk = int(body.get("fake_tokens_per_chunk", 1))
        empty = int(body.get("fake_empty_text_chunks", 0))  # chunks whose token adds no text yet
        if chat:  # the role first, before any token (as braid does)
            await send({"id": "x", "model": MODEL, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        await asyncio.sleep(TTFT_S)
        sent = 0
        while sent < n:
            if sent:
                await asyncio.sleep(ITL_S)
            k = min(per_chunk, n - sent)
            sent += k
            finish = "length" if sent == n else None
            text = "" if empty > 0 else "tok " * k
            empty -= 1
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish})
            await send({"id": "x", "model": MODEL, "choices": [choice]})
            if mode == 1:
                await send({"error": {"message": "injected stream error", "code": 500}})
                return resp
        if not body.get("fake_no_usage"):
            usage = {"completion_tokens": n}
            if isinstance(prompt, list):
                usage["prompt_tokens"] = len(prompt)
            await send({"id": "x", "model": MODEL, "choices": [], "usage": usage})
        await send(b"[DONE]")
        return resp


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="braid")
    add_bench_subparsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", "serve", *argv])


def _run(argv: list[str]) -> int:
    args = _parse(argv)
    return args.func(args)


def _modes(num: int, seed: int, input_len: int = 8, output_len: int = 4) -> list[int]:
    return [r.prompt[0] % 7 for r in serve.random_requests(num, input_len, output_len, seed=seed)]


def _seed_with_clean_warmup(cond) -> int:
    """A dataset seed meeting `cond` whose warm-up prompt (seed + 1_000_003) the server answers normally."""
    return next(s for s in range(1000) if _modes(1, s + 1_000_003)[0] not in (0, 1, 2) and cond(s))


def test_timings_tokens_and_json(server, tmp_path, capsys):
    out = tmp_path / "r.json"
    seed = 3
    modes = _modes(12, seed)
    expected_fail = sum(m in (0, 1) for m in modes)
    assert 0 < expected_fail < 12, "the seed should give both failures and successes"
    rc = _run(["--base-url", server.base_url, "--num-prompts", "12", "--input-len", "8", "--output-len", "4",
               "--seed", str(seed), "--num-warmups", "0", "--result-json", str(out), "--save-detailed"])
    assert rc == 1  # some requests failed
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Median TTFT (ms):" in table

    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert result["benchmark"] == "serve" and result["model"] == MODEL  # found through GET /v1/models
    assert {"config", "run_info", "runs", "url"} <= set(result)
    assert "git_commit" in result["run_info"]
    assert "api_key" not in result["config"]
    (run,) = result["runs"]
    s = run["summary"]
    assert s["num_requests"] == 12 and s["failed"] == expected_fail and s["completed"] == 12 - expected_fail
    assert sum(s["errors"].values()) == expected_fail
    assert any("HTTP 500" in e and "injected failure" in e for e in s["errors"]) == (0 in modes)
    assert any("injected stream error" in e for e in s["errors"]) == (1 in modes)

    reqs = run["requests"]
    assert len(reqs) == 12
    for r, mode in zip(reqs, modes):
        assert r["success"] == (mode not in (0, 1)), r
        if not r["success"]:
            assert r["error"]
            continue
        assert r["output_tokens"] == 4 and r["num_chunks"] == 4 and r["usage_reported"]
        assert r["prompt_len"] == 8
        assert TTFT_S * 0.8 <= r["ttft"] < TTFT_S + 2.0
        assert len(r["itl"]) == 3 and all(0 <= g < ITL_S + 2.0 for g in r["itl"])
        assert r["e2el"] >= r["ttft"] + sum(r["itl"]) - 1e-6
        assert r["tpot"] == pytest.approx((r["e2el"] - r["ttft"]) / 3)
        assert ITL_S * 0.5 <= r["tpot"] < ITL_S + 2.0
    assert s["total_output_tokens"] == 4 * s["completed"]
    assert s["total_input_tokens"] == 8 * s["completed"]
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    assert s["total_token_throughput"] == pytest.approx(
        (s["total_input_tokens"] + s["total_output_tokens"]) / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(s["completed"] / s["duration_s"])
    assert TTFT_S * 800 <= s["median_ttft_ms"] <= s["p99_ttft_ms"]
    assert ITL_S * 500 <= s["mean_itl_ms"] < ITL_S * 1000 + 2000
    assert s["mean_tpot_ms"] == pytest.approx(
        1000 * sum(r["tpot"] for r in reqs if r["success"]) / s["completed"])
    ok = [r for r in reqs if r["success"]]
    assert s["mean_e2el_ms"] == pytest.approx(1000 * sum(r["e2el"] for r in ok) / len(ok))
    assert s["duration_s"] >= max(r["start"] + r["e2el"] for r in ok) - 1e-6

    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0 and body["model"] == MODEL
    assert isinstance(body["prompt"], list) and len(body["prompt"]) == 8


def test_sweep_concurrency_and_plot(server, tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    seed = _seed_with_clean_warmup(lambda s: True)
    rc = _run(["--base-url", server.base_url, "--model", MODEL, "--num-prompts", "6", "--input-len", "8",
               "--output-len", "3", "--seed", str(seed), "--max-concurrency", "1,3,inf",
               "--result-json", str(out), "--plot", str(png)])
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["max_concurrency"] for r in runs] == [1, 3, None]
    assert [r["dataset_seed"] for r in runs] == [seed, seed + 1, seed + 2]
    total_failed = sum(r["summary"]["failed"] for r in runs)
    assert rc == (1 if total_failed else 0)
    for run in runs:
        expected_fail = sum(m in (0, 1) for m in _modes(6, run["dataset_seed"], output_len=3))
        assert run["summary"]["failed"] == expected_fail

    def max_overlap(reqs) -> int:
        events = sorted([(r["start"], 1) for r in reqs] + [(r["start"] + r["e2el"] - 1e-4, -1) for r in reqs
                                                           if r["success"]])
        depth = best = 0
        for _, d in events:
            depth += d
            best = max(best, depth)
        return best

    ok = lambda run: [r for r in run["requests"] if r["success"]]  # noqa: E731
    # Without --save-detailed the file keeps each request's numbers but not its per-token gaps.
    assert all("itl" not in r and "ttft" in r for run in runs for r in run["requests"])
    assert all(run["summary"]["mean_itl_ms"] > 0 for run in runs if run["summary"]["completed"])
    assert max_overlap(ok(runs[0])) == 1  # concurrency 1: one at a time
    assert max_overlap(ok(runs[1])) <= 3
    # A warm-up request plus 6 requests per run, and the warm-up's prompt is none of the measured ones.
    assert len(server.bodies) == 1 + 18
    measured = [tuple(b["prompt"]) for b in server.bodies[1:]]
    assert tuple(server.bodies[0]["prompt"]) not in measured
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_chat_endpoint_no_usage_multi_token_chunks_and_api_key(server, tmp_path, monkeypatch):
    out = tmp_path / "chat.json"
    monkeypatch.setenv("OPENAI_API_KEY", "sekrit")
    server.expect_auth = "Bearer sekrit"
    extra = json.dumps({"fake_no_usage": True, "fake_tokens_per_chunk": 2})
    rc = _run(["--base-url", server.base_url + "/", "--endpoint", "/v1/chat/completions", "--num-prompts", "4",
               "--input-len", "16", "--output-len", "6", "--extra-body", extra, "--temperature", "0.5",
               "--no-ignore-eos", "--result-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert "sekrit" not in out.read_text()
    (run,) = result["runs"]
    assert run["summary"]["completed"] == 4
    for r in run["requests"]:
        # No usage chunk: output tokens fall back to the number of content chunks (2 tokens each).
        assert not r["usage_reported"] and r["num_chunks"] == 3 and r["output_tokens"] == 3
        assert r["prompt_len"] is None  # text without a tokenizer, and no usage from the server
    assert run["summary"]["input_tokens_unknown"] == 4
    body = server.bodies[-1]
    assert body["messages"][0]["role"] == "user" and len(body["messages"][0]["content"].split()) == 16
    assert body["temperature"] == 0.5 and "ignore_eos" not in body and "prompt" not in body


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_tokens_without_text_still_arrive(server, tmp_path, endpoint):
    """A token can add no text yet (half a UTF-8 character): its chunk is still the first token
    (TTFT) and an ITL gap, as in vLLM's benchmark. A chat role announcement is no token."""
    out = tmp_path / "e.json"
    seed = _seed_with_clean_warmup(lambda s: _modes(1, s)[0] > 2)
    rc = _run(["--base-url", server.base_url, "--model", MODEL, "--endpoint", endpoint, "--num-prompts", "1",
               "--input-len", "8", "--output-len", "4", "--seed", str(seed), "--num-warmups", "0",
               "--extra-body", json.dumps({"fake_empty_text_chunks": 2}), "--result-json", str(out),
               "--save-detailed"])
    assert rc == 0
    (r,) = json.loads(out.read_text())["runs"][0]["requests"]
    assert r["success"] and r["output_tokens"] == 4
    assert r["num_chunks"] == 4 and len(r["itl"]) == 3  # every token's chunk, none for the role


def test_metadata_recorded(server, tmp_path, capsys):
    """The server's flags are invisible to the client: --metadata records them in the result."""
    out = tmp_path / "md.json"
    rc = _run(["--base-url", server.base_url, "--model", MODEL, "--num-prompts", "1", "--input-len", "8",
               "--output-len", "2", "--seed", str(_seed_with_clean_warmup(lambda s: _modes(1, s)[0] > 2)),
               "--result-json", str(out), "--metadata", "server_args=--async-scheduling --max-num-seqs 256",
               "shape=llama3-8b"])
    assert rc == 0
    assert json.loads(out.read_text())["metadata"] == {"server_args": "--async-scheduling --max-num-seqs 256",
                                                      "shape": "llama3-8b"}
    assert _run(["--base-url", server.base_url, "--metadata", "no-equals-sign"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_request_timeout_counts_as_failure(server, tmp_path):
    seed = _seed_with_clean_warmup(lambda s: 2 in _modes(6, s))
    modes = _modes(6, seed)
    out = tmp_path / "t.json"
    rc = _run(["--base-url", server.base_url, "--model", MODEL, "--num-prompts", "6", "--input-len", "8",
               "--output-len", "4", "--seed", str(seed), "--request-timeout", "0.5",
               "--extra-body", '{"fake_stall": true}', "--result-json", str(out)])
    assert rc == 1
    s = json.loads(out.read_text())["runs"][0]["summary"]
    assert s["failed"] == sum(m in (0, 1, 2) for m in modes)
    assert any("timed out" in e for e in s["errors"])


def test_max_run_time_cancels_and_counts(server, tmp_path):
    out = tmp_path / "m.json"
    rc = _run(["--base-url", server.base_url, "--model", MODEL, "--num-prompts", "5", "--input-len", "8",
               "--output-len", "200", "--max-concurrency", "1", "--num-warmups", "0", "--seed", "5",
               "--max-run-time", "0.3", "--result-json", str(out)])
    assert rc == 1
    s = json.loads(out.read_text())["runs"][0]["summary"]
    assert s["num_requests"] == 5 and s["failed"] == 5
    assert s["duration_s"] < 3
    assert any("max-run-time" in e for e in s["errors"])


def test_poisson_arrivals_spread_out(server, tmp_path):
    out = tmp_path / "p.json"
    _run(["--base-url", server.base_url, "--model", MODEL, "--num-prompts", "8", "--input-len", "8",
          "--output-len", "2", "--request-rate", "40", "--num-warmups", "0", "--result-json", str(out)])
    run = json.loads(out.read_text())["runs"][0]
    starts = sorted(r["start"] for r in run["requests"])
    assert run["request_rate"] == 40
    assert starts[-1] - starts[0] > 0.02  # 7 exponential gaps of mean 25 ms


def test_unreachable_server_and_bad_args(tmp_path, capsys):
    port = _free_port()
    assert _run(["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "2"]) == 2
    assert "warm-up request" in capsys.readouterr().err
    assert _run(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2"]) == 2  # GET /v1/models fails
    assert _run(["--max-concurrency", "1,x"]) == 2
    assert _run(["--dataset", "sharegpt"]) == 2
    assert "--dataset-path" in capsys.readouterr().err


def test_datasets_with_tokenizer(server, tmp_path):
    from tests.tiny_checkpoints import make_tiny_checkpoint

    from braid.transformers_utils import load_tokenizer

    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt")
    tok = load_tokenizer(str(ckpt))
    reqs = serve.random_requests(5, 24, 4, seed=1, range_ratio=0.5, tokenizer=tok, as_text=True)
    for r in reqs:
        assert isinstance(r.prompt, str) and 12 <= len(tok.encode(r.prompt, add_special_tokens=False)) <= 36
        assert r.prompt_len == len(tok.encode(r.prompt, add_special_tokens=False))
        assert 2 <= r.output_len <= 6

    data = [
        {"conversations": [{"from": "human", "value": "Hello world! How are you today?"},
                           {"from": "gpt", "value": "I am fine, thank you, and you? The quick brown fox."}]},
        {"conversations": [{"from": "human", "value": "Hi"}]},  # no reply: skipped
        {"conversations": [{"from": "system", "value": "be nice"},
                           {"from": "human", "value": "The capital of France is what city, please?"},
                           {"from": "gpt", "value": "The capital of France is Paris, a city on the Seine."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "s.json"
    rc = _run(["--base-url", server.base_url, "--dataset", "sharegpt", "--dataset-path", str(path),
               "--tokenizer", str(ckpt), "--num-prompts", "10", "--result-json", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["summary"]["completed"] == 2
    replies = {d["conversations"][-1]["value"] for d in data[::2]}
    want = sorted(len(tok.encode(t, add_special_tokens=False)) for t in replies)
    assert sorted(r["output_tokens"] for r in run["requests"]) == want
    assert sorted(r["output_len_requested"] for r in run["requests"]) == want
    prompts = {b["prompt"] for b in server.bodies if isinstance(b["prompt"], str)}
    assert {p.split(". ", 1)[-1] if p.startswith("Warm-up") else p for p in prompts} == {
        "Hello world! How are you today?", "The capital of France is what city, please?"}
    assert sum(p.startswith("Warm-up 0. ") for p in prompts) == 1


def test_sse_parser_handles_split_and_unterminated_lines():
    class Stream:
        async def iter_any(self):
            for piece in (b'data: {"a"', b': 1}\r\n\n: comment\n', b"event: x\ndata:[DO", b"NE]"):
                yield piece

    async def collect():
        return [line async for line in serve._sse_data(Stream())]

    assert asyncio.run(collect()) == [b'{"a": 1}', b"[DONE]"]
