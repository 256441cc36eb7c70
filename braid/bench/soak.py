"""Reproducible soak of `braid serve`: start the server as a subprocess on a free loopback
port, hammer it with a deterministic mix of completion / chat requests (streaming or not,
mixed sampling parameters, clients that disconnect), then check that it held: no 5xx,
every request that was not aborted finished with a valid finish_reason, the engine is idle
with a free KV pool afterwards, and the server's memory did not keep growing.

    python -m braid.bench.soak [--model PATH] [--num-requests 5000] [--concurrency 256]
        [--abort-fraction 0.1] [--seed 0] [--max-run-time 1800] [--result-json out.json]
        [--server-arg=--kv-cache-memory=1GiB ...]

Exit code 0 only if every check passes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil

from braid.bench.run_info import run_info

PROMPTS = [
    "Count from {i} to {j}.",
    "Write a short poem about the number {i}.",
    "Explain why the sky is blue in {j} words.",
    "List {i} fruits, separated by commas.",
    "Translate 'hello world number {i}' into French.",
    "What is {i} plus {j}?",
    "Tell me a very long story about a robot named R{i}.",
    "Summarize: the quick brown fox jumps over the lazy dog {j} times.",
]
STOPS = ["\n", ".", " the", ",", "!", "\n\n"]
VALID_FINISH = ("stop", "length")


# ----------------------------------------------------------------------------- the plan


@dataclass
class Spec:
    index: int
    endpoint: str  # "completions" | "chat"
    stream: bool
    body: dict[str, Any]
    max_tokens: int
    n: int
    abort: str | None = None  # None | "before_response" | "mid_stream"
    abort_delay_s: float = 0.0  # before_response: cancel after this long
    abort_after_events: int = 0  # mid_stream: close after this many SSE events


def make_plan(num_requests: int, abort_fraction: float, seed: int) -> list[Spec]:
    """The requests, drawn from one seeded RNG: the same seed gives the same plan."""
    rng = random.Random(seed)
    plan = []
    for i in range(num_requests):
        endpoint = rng.choice(["completions", "chat"])
        stream = rng.random() < 0.5
        max_tokens = rng.randint(1, 32)
        n = rng.choice([1, 1, 1, 2])
        temperature = rng.choice([0.0, 0.7, 1.0])
        prompt = rng.choice(PROMPTS).format(i=i, j=rng.randint(1, 999))
        body: dict[str, Any] = {"max_tokens": max_tokens, "n": n, "temperature": temperature}
        if temperature > 0:
            if rng.random() < 0.5:
                body["top_p"] = rng.choice([0.5, 0.9, 0.95])
            if rng.random() < 0.5:
                body["top_k"] = rng.choice([1, 5, 40])
            if rng.random() < 0.5:
                body["seed"] = rng.randint(0, 2**31 - 1)
        if rng.random() < 0.3:
            body["stop"] = rng.sample(STOPS, rng.randint(1, 2))
        want_logprobs = rng.random() < 0.25
        if endpoint == "completions":
            body["prompt"] = prompt
            if want_logprobs:
                body["logprobs"] = rng.choice([0, 1, 5])
        else:
            messages = [{"role": "user", "content": prompt}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": "You are a concise assistant."})
            body["messages"] = messages
            if want_logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = rng.choice([0, 1, 5])
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        spec = Spec(i, endpoint, stream, body, max_tokens, n)
        if rng.random() < abort_fraction:
            if stream and rng.random() < 0.7:
                spec.abort = "mid_stream"
                spec.abort_after_events = rng.randint(0, max(1, max_tokens // 2))
            else:
                spec.abort = "before_response"
                spec.abort_delay_s = rng.uniform(0.0, 1.0)
        plan.append(spec)
    return plan


# ----------------------------------------------------------------------------- checking


def check_finish(finishes: dict[int, str | None], completion_tokens: int | None, spec: Spec) -> str | None:
    """None if the choices' finish reasons agree with the usage; else what is wrong.

    Per choice: "length" means it produced exactly max_tokens; fewer tokens means "stop".
    Usage sums the n choices, so: total = L * max_tokens + (tokens of the S stop choices),
    each stop choice holding 1..max_tokens tokens (max_tokens itself only when EOS or a stop
    string landed on the last token)."""
    if sorted(finishes) != list(range(spec.n)):
        return f"choices {sorted(finishes)} for n={spec.n}"
    bad = [f for f in finishes.values() if f not in VALID_FINISH]
    if bad:
        return f"finish_reason {bad}"
    if completion_tokens is None:
        return "no usage"
    n_length = sum(f == "length" for f in finishes.values())
    n_stop = spec.n - n_length
    rest = completion_tokens - n_length * spec.max_tokens
    if not (n_stop <= rest <= n_stop * spec.max_tokens):
        return (f"finish_reasons {dict(sorted(finishes.items()))} inconsistent with "
                f"completion_tokens={completion_tokens}, max_tokens={spec.max_tokens}")
    return None


@dataclass
class Outcome:
    status: int | str  # HTTP status, or "aborted", "error:<Type>"
    ok: bool = False
    problem: str | None = None
    completion_tokens: int = 0
    stop_at_max_tokens: bool = False


async def _read_stream(resp: aiohttp.ClientResponse, spec: Spec, abort_after: int | None) -> Outcome:
    finishes: dict[int, str | None] = {}
    usage = None
    done = False
    events = 0
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            events += 1
            if data == b"[DONE]":
                done = True
                continue
            obj = json.loads(data)
            if "error" in obj:
                return Outcome(resp.status, problem=f"error event: {obj['error']}")
            for c in obj.get("choices") or []:
                finishes.setdefault(c["index"], None)
                if c.get("finish_reason") is not None:
                    finishes[c["index"]] = c["finish_reason"]
            if obj.get("usage"):
                usage = obj["usage"]
        if abort_after is not None and events >= abort_after:
            return Outcome("aborted")  # the caller's `async with` closes the connection
    # A stream that ended before its abort point is judged as a completed request.
    if not done:
        return Outcome(resp.status, problem="stream ended without [DONE]")
    tokens = usage.get("completion_tokens") if usage else None
    problem = check_finish(finishes, tokens, spec)
    return Outcome(resp.status, ok=problem is None, problem=problem, completion_tokens=tokens or 0,
                   stop_at_max_tokens=any(f == "stop" for f in finishes.values()) and spec.n == 1
                   and tokens == spec.max_tokens)


def _judge_full(obj: dict, status: int, spec: Spec) -> Outcome:
    finishes = {c["index"]: c.get("finish_reason") for c in obj.get("choices", [])}
    tokens = (obj.get("usage") or {}).get("completion_tokens")
    problem = check_finish(finishes, tokens, spec)
    if problem is None and "logprobs" in spec.body and spec.body["logprobs"] is not False:
        if any(c.get("logprobs") is None for c in obj["choices"]):
            problem = "logprobs requested but missing"
    return Outcome(status, ok=problem is None, problem=problem, completion_tokens=tokens or 0,
                   stop_at_max_tokens=spec.n == 1 and finishes.get(0) == "stop" and tokens == spec.max_tokens)


async def run_one(session: aiohttp.ClientSession, base: str, model: str, spec: Spec) -> Outcome:
    url = f"{base}/v1/{'completions' if spec.endpoint == 'completions' else 'chat/completions'}"
    body = {"model": model, **spec.body}

    async def go() -> Outcome:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                text = await resp.text()
                return Outcome(resp.status, problem=f"HTTP {resp.status}: {text[:300]}")
            if spec.stream:
                return await _read_stream(resp, spec, spec.abort_after_events if spec.abort == "mid_stream" else None)
            return _judge_full(await resp.json(), resp.status, spec)

    try:
        if spec.abort == "before_response":
            try:
                return await asyncio.wait_for(go(), spec.abort_delay_s)
            except asyncio.TimeoutError:
                return Outcome("aborted")
        return await go()
    except (aiohttp.ClientError, json.JSONDecodeError, KeyError, ValueError) as e:
        return Outcome(f"error:{type(e).__name__}", problem=f"{type(e).__name__}: {e}"[:300])


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


class Server:
    def __init__(self, model: str | None, port: int, extra: list[str], device: str) -> None:
        cmd = [sys.executable, "-m", "braid.entrypoints.cli", "serve"]
        if model:
            cmd.append(model)
        cmd += ["--port", str(port), "--host", "127.0.0.1", "--max-num-seqs", "256", "--device", device] + extra
        self.cmd = cmd
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)
        self.children: list[psutil.Process] = []

    def output(self, tail: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read()[-tail:]

    def rss(self) -> int:
        total = 0
        try:
            procs = [self.ps] + self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> dict[str, Any]:
        """SIGTERM; kill after 30 s; then make sure no child is left (killing any that is)."""
        try:
            self.children = self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        forced = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                forced = True
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 10
        alive = self.children
        while True:
            alive = [p for p in alive if _alive(p)]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return {"exit_code": self.proc.returncode, "forced_kill": forced,
                "children_left_behind": [p.pid for p in alive]}


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class RssSampler(threading.Thread):
    def __init__(self, server: Server, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - t0, self.server.rss()))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.samples.append((self.samples[-1][0] + self.interval if self.samples else 0.0, self.server.rss()))


def rss_growth(samples: list[tuple[float, int]]) -> dict[str, Any]:
    """Growth over the second half of the run: the mean of the last 3 samples against the mean
    of the 3 around the midpoint (means smooth the allocator's breathing)."""
    if len(samples) < 4:
        return {"samples": len(samples), "growth_second_half": 0.0}
    mid = len(samples) // 2
    at_mid = [r for _, r in samples[max(0, mid - 1):mid + 2]]
    at_end = [r for _, r in samples[-3:]]
    m, e = sum(at_mid) / len(at_mid), sum(at_end) / len(at_end)
    rs = [r for _, r in samples]
    return {"samples": len(samples), "start_mib": rs[0] / 2**20, "mid_mib": m / 2**20, "end_mib": e / 2**20,
            "peak_mib": max(rs) / 2**20, "growth_second_half": (e - m) / m if m else 0.0}


# ----------------------------------------------------------------------------- the run


async def _wait_healthy(server: Server, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.proc.returncode}:\n{server.output()}")
            try:
                async with s.get(server.url + "/health") as r:
                    if r.status == 200:
                        async with s.get(server.url + "/v1/models") as m:
                            return (await m.json())["data"][0]["id"]
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.25)
    raise TimeoutError(f"the server was not healthy within {timeout} s:\n{server.output()}")


async def _metrics(server: Server) -> dict[str, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(server.url + "/metrics") as r:
            return parse_metrics(await r.text())


async def _settle(server: Server, timeout: float) -> tuple[dict[str, float], float]:
    t0 = time.monotonic()
    while True:
        m = await _metrics(server)
        idle = (m.get("braid:kv_cache_usage_perc") == 0 and m.get("braid:num_requests_running") == 0
                and m.get("braid:num_requests_waiting") == 0)
        if idle or time.monotonic() - t0 > timeout:
            return m, time.monotonic() - t0
        await asyncio.sleep(0.25)


async def _load(server: Server, model: str, plan: list[Spec], concurrency: int,
                deadline: float) -> tuple[list[Outcome | None], bool]:
    outcomes: list[Outcome | None] = [None] * len(plan)
    it = iter(plan)
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def worker():
            for spec in it:
                if time.monotonic() > deadline:
                    return
                outcomes[spec.index] = await run_one(session, server.url, model, spec)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    return outcomes, not pending


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m braid.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder/file (default: the embedded default model)")
    p.add_argument("--num-requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--abort-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-run-time", type=float, default=1800.0,
                   help="seconds for the load phase; requests not done by then fail the run")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--settle-timeout", type=float, default=15.0,
                   help="seconds to wait for /metrics to show an idle engine after the load")
    p.add_argument("--rss-growth-limit", type=float, default=0.10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for `braid serve` (repeatable; use --server-arg=--flag=value)")
    p.add_argument("--result-json", default=None)
    return p


def _table(result: dict) -> str:
    rows = [("check", "pass", "detail")]
    for name, c in result["checks"].items():
        rows.append((name, "PASS" if c["pass"] else "FAIL", c["detail"]))
    w0 = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{w0}}  {r[1]:<4}  {r[2]}" for r in rows]
    s = result["stats"]
    lines.append("")
    lines.append(f"requests {s['num_requests']}  completed {s['completed_ok']}  aborted {s['aborted']}  "
                 f"in {s['load_duration_s']:.1f} s: {s['request_throughput']:.2f} req/s, "
                 f"{s['output_token_throughput']:.1f} completion tok/s")
    lines.append("statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(result["status_counts"].items())))
    r = result["rss"]
    if "mid_mib" in r:
        lines.append(f"server RSS MiB: start {r['start_mib']:.0f}, mid {r['mid_mib']:.0f}, end {r['end_mib']:.0f}, "
                     f"peak {r['peak_mib']:.0f} (second-half growth {100 * r['growth_second_half']:.2f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args.num_requests, args.abort_fraction, args.seed)
    # The git commit, torch version and host, as every benchmark result records them; taken
    # before the server starts, whose start-up would slow the host timing in it.
    info = run_info()
    port = free_port()
    server = Server(args.model, port, args.server_arg, args.device)
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()}, "server_cmd": server.cmd,
                              "run_info": info}
    try:
        model = asyncio.run(_wait_healthy(server, args.startup_timeout))
        sampler = RssSampler(server)
        sampler.start()
        t0 = time.monotonic()
        outcomes, in_time = asyncio.run(_load(server, model, plan, args.concurrency, t0 + args.max_run_time))
        load_s = time.monotonic() - t0
        sampler.stop()
        metrics, settle_s = asyncio.run(_settle(server, args.settle_timeout))
    except BaseException:
        print(server.output(), file=sys.stderr)
        raise
    finally:
        shutdown = server.stop()

    status_counts: dict[str, int] = {}
    problems: list[dict] = []
    not_run = 0
    for spec, o in zip(plan, outcomes):
        if o is None:
            not_run += 1
            continue
        status_counts[str(o.status)] = status_counts.get(str(o.status), 0) + 1
        if o.status != "aborted" and not o.ok:
            problems.append({"index": spec.index, "endpoint": spec.endpoint, "stream": spec.stream,
                             "abort": spec.abort, "status": o.status, "problem": o.problem, "body": spec.body})
    n_5xx = sum(v for k, v in status_counts.items() if k.isdigit() and int(k) >= 500)
    aborted = status_counts.get("aborted", 0)
    completed = [o for o in outcomes if o is not None and o.ok]
    tokens = sum(o.completion_tokens for o in completed)
    rss = rss_growth(sampler.samples)
    idle = {k: metrics.get(f"braid:{k}") for k in ("kv_cache_usage_perc", "num_requests_running",
                                                   "num_requests_waiting")}
    checks = {
        "no_5xx": {"pass": n_5xx == 0, "detail": f"{n_5xx} responses with status >= 500"},
        "all_requests_run_in_time": {"pass": in_time and not_run == 0,
                                     "detail": f"{not_run} not run/finished within {args.max_run_time:.0f} s"},
        "non_aborted_completed_validly": {
            "pass": not problems,
            "detail": f"{len(problems)} of {len(plan) - aborted - not_run} non-aborted requests failed"},
        "engine_idle_after_run": {"pass": idle["kv_cache_usage_perc"] == 0 and idle["num_requests_running"] == 0
                                  and idle["num_requests_waiting"] == 0,
                                  "detail": f"{idle} after {settle_s:.1f} s"},
        "rss_growth_second_half": {"pass": rss["growth_second_half"] < args.rss_growth_limit,
                                   "detail": f"{100 * rss['growth_second_half']:.2f}% "
                                             f"(limit {100 * args.rss_growth_limit:.0f}%)"},
        "clean_shutdown": {"pass": shutdown["exit_code"] == 0 and not shutdown["forced_kill"]
                           and not shutdown["children_left_behind"], "detail": str(shutdown)},
    }
    result.update({
        "checks": checks,
        "passed": all(c["pass"] for c in checks.values()),
        "status_counts": status_counts,
        "stats": {"num_requests": len(plan), "completed_ok": len(completed), "aborted": aborted,
                  "planned_aborts": sum(s.abort is not None for s in plan),
                  "stop_at_max_tokens": sum(o.stop_at_max_tokens for o in completed),
                  "load_duration_s": load_s, "settle_s": settle_s,
                  "request_throughput": len(completed) / load_s if load_s else 0.0,
                  "output_token_throughput": tokens / load_s if load_s else 0.0,
                  "completion_tokens": tokens},
        "rss": rss,
        "rss_samples": sampler.samples,
        "metrics_after": {k: v for k, v in metrics.items() if k.startswith("braid:")},
        "problems": problems[:50],
    })
    print(_table(result))
    if problems:
        print("first problems:", file=sys.stderr)
        for p in problems[:5]:
            print(" ", json.dumps(p)[:500], file=sys.stderr)
    if not result["passed"]:
        print("server log tail:\n" + server.output(3000), file=sys.stderr)
    if args.result_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.result_json)), exist_ok=True)
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
