"""Load generator for any OpenAI-compatible server (braid, vLLM, SGLang, ...).

    braid bench serve --base-url http://127.0.0.1:8000 --dataset random \
        --input-len 1024 --output-len 128 --num-prompts 200 --max-concurrency 1,16,64 \
        --result-json out.json --plot out.png

Every request streams; per request we record TTFT (first output chunk, even one whose
text is empty), the gaps between output chunks (ITL), end-to-end latency and the output
token count (the final usage chunk when the server sends one, else the number of output chunks).
Metric names follow vLLM's benchmark_serving so results line up side by side.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
# Stand-in text when a prompt must be text but no tokenizer was given (about one token per word).
_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact water river mountain engine signal memory paper music "
          "garden window letter market school family story city light color table road field").split()


# ----------------------------------------------------------------------------- data


@dataclass
class SampleRequest:
    prompt: str | list[int]  # text, or token ids (completions endpoint only)
    prompt_len: int | None  # tokens, when known on our side
    output_len: int


@dataclass
class RequestResult:
    index: int
    success: bool = False
    error: str = ""
    prompt_len: int | None = None  # usage.prompt_tokens when reported, else the dataset's count
    output_tokens: int = 0
    num_chunks: int = 0  # output chunks received (a token's text may be empty: see _carries_output)
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between output chunks
    e2el: float = 0.0  # seconds
    start: float = 0.0  # seconds since the run started
    usage_reported: bool = False

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def _load_tokenizer(path: str | None):
    if not path:
        return None
    from braid.transformers_utils import load_tokenizer

    return load_tokenizer(path)


def _lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> list[int]:
    if not 0 <= ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {ratio}")
    lo, hi = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def _token_pool(tokenizer, token_range: tuple[int, int]) -> np.ndarray:
    if tokenizer is None:
        return np.arange(*token_range)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = np.array([i for i in range(len(tokenizer)) if i not in special])
    return ids


def _ids_to_text(tokenizer, rng: np.random.Generator, pool: np.ndarray, ids: list[int], target: int) -> tuple[str, int]:
    """Decode random ids to text whose re-encoding is (close to) `target` tokens."""
    text = tokenizer.decode(ids)
    for _ in range(8):
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) == target:
            break
        ids = enc[:target] if len(enc) > target else enc + [int(t) for t in rng.choice(pool, target - len(enc))]
        text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def random_requests(num_prompts: int, input_len: int, output_len: int, seed: int = 0, range_ratio: float = 0.0,
                    tokenizer=None, as_text: bool = False,
                    token_range: tuple[int, int] = (20, 256)) -> list[SampleRequest]:
    """Random prompts: token ids (exact lengths) unless `as_text`; text is decoded from random
    ids with `tokenizer`, or made of common words when there is none (lengths then approximate)."""
    rng = np.random.default_rng(seed)
    in_lens = _lengths(rng, input_len, range_ratio, num_prompts)
    out_lens = _lengths(rng, output_len, range_ratio, num_prompts)
    pool = _token_pool(tokenizer, token_range)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        if as_text and tokenizer is None:
            words = rng.choice(len(_WORDS), n_in)
            requests.append(SampleRequest(" ".join(_WORDS[w] for w in words), None, n_out))
            continue
        ids = [int(t) for t in rng.choice(pool, n_in)]
        if as_text:
            text, n = _ids_to_text(tokenizer, rng, pool, ids, n_in)
            requests.append(SampleRequest(text, n, n_out))
        else:
            requests.append(SampleRequest(ids, n_in, n_out))
    return requests


def sharegpt_requests(path: str, num_prompts: int, output_len: int, seed: int = 0,
                      tokenizer=None) -> list[SampleRequest]:
    """ShareGPT JSON: prompt = first human turn; output length = the reply's token count with a
    tokenizer (pairs with a prompt or reply under 4 tokens, a prompt over 1024 or a sum over 2048
    are skipped, as in vLLM), else `output_len`."""
    with open(path) as f:
        data = json.load(f)
    pairs = []
    for entry in data:
        turns = entry.get("conversations") or entry.get("conversation") or []
        for i, turn in enumerate(turns[:-1]):
            if turn.get("from") == "human" and turns[i + 1].get("from") == "gpt":
                pairs.append((turn.get("value") or "", turns[i + 1].get("value") or ""))
                break
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        if len(requests) == num_prompts:
            break
        if not prompt:
            continue
        if tokenizer is None:
            requests.append(SampleRequest(prompt, None, output_len))
            continue
        n_in = len(tokenizer.encode(prompt, add_special_tokens=False))
        n_out = len(tokenizer.encode(reply, add_special_tokens=False))
        if n_in < 4 or n_out < 4 or n_in > 1024 or n_in + n_out > 2048:
            continue
        requests.append(SampleRequest(prompt, n_in, n_out))
    if len(requests) < num_prompts:
        logger.warning("%s gave %d usable prompts of the %d asked for", path, len(requests), num_prompts)
    if not requests:
        raise ValueError(f"no usable prompts in {path}")
    return requests


# ----------------------------------------------------------------------------- one request


def _payload(req: SampleRequest, model: str, endpoint: str, temperature: float, ignore_eos: bool,
             extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == CHAT:
        content = req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt))
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = req.prompt
    body.update(extra)
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _carries_output(chunk: dict[str, Any]) -> bool:
    """Whether a chunk marks output tokens arriving (TTFT, ITL), even with empty text: a token
    can add no text yet (an incomplete UTF-8 character, a skipped special token), but it was
    generated then, and vLLM's benchmark counts that chunk too. A chat chunk that announces the
    role with no content is no token (braid sends it before the prefill)."""
    choices = chunk.get("choices") or []
    if not choices:
        return False  # e.g. the final usage chunk
    if "delta" in choices[0]:
        return bool(_chunk_text(chunk)) or "role" not in (choices[0].get("delta") or {})
    return True


def _error_text(obj: Any) -> str:
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(obj)


async def _sse_data(stream):
    """The payloads of an event stream's `data:` lines, as they arrive."""
    buffer = b""
    async for raw in stream.iter_any():
        buffer += raw
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:"):  # skips blank separators, comments, event: lines
                yield line[5:].strip()
    line = buffer.strip()
    if line.startswith(b"data:"):
        yield line[5:].strip()


async def send_request(session, url: str, headers: dict[str, str], body: dict[str, Any], index: int,
                       prompt_len: int | None, t0: float, timeout: float) -> RequestResult:
    import aiohttp

    res = RequestResult(index=index, prompt_len=prompt_len)
    start = time.perf_counter()
    res.start = start - t0
    last = start
    finished = False
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                text = (await resp.text())[:500]
                try:
                    text = _error_text(json.loads(text))
                except ValueError:
                    pass
                res.error = f"HTTP {resp.status}: {text}"
                return res
            async for line in _sse_data(resp.content):
                if line == b"[DONE]":
                    finished = True
                    continue
                now = time.perf_counter()
                chunk = json.loads(line)
                if chunk.get("error"):
                    res.error = f"stream error: {_error_text(chunk)}"
                    return res
                if chunk.get("usage"):
                    res.usage_reported = True
                    usage = chunk["usage"]
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    if usage.get("prompt_tokens") is not None:
                        res.prompt_len = int(usage["prompt_tokens"])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("finish_reason"):
                    finished = True
                if _carries_output(chunk):
                    if res.num_chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.num_chunks += 1
            res.e2el = time.perf_counter() - start
    except asyncio.TimeoutError:
        res.error = f"timed out after {timeout:g} s (--request-timeout)"
        return res
    except asyncio.CancelledError:
        res.error = "cancelled: the run reached --max-run-time"
        return res
    except Exception as e:  # connection reset, bad JSON, ...
        res.error = f"{type(e).__name__}: {e}"
        return res
    if not res.usage_reported:
        res.output_tokens = res.num_chunks
    if res.num_chunks == 0:
        res.error = "the stream ended without any output"
    elif not finished:
        res.error = "the stream ended before [DONE] or a finish_reason"
    else:
        res.success = True
    return res


# ----------------------------------------------------------------------------- metrics


def _stats(values: list[float], name: str) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "std", "min", "max", "p90", "p99")}
    return {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(arr.std()),
        f"min_{name}_ms": float(arr.min()),
        f"max_{name}_ms": float(arr.max()),
        f"p90_{name}_ms": float(np.percentile(arr, 90)),
        f"p99_{name}_ms": float(np.percentile(arr, 99)),
    }


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    duration = max(duration, 1e-9)
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "input_tokens_unknown": sum(1 for r in ok if r.prompt_len is None),
    }
    summary.update(_stats([r.ttft for r in ok], "ttft"))
    summary.update(_stats([r.tpot for r in ok if r.tpot is not None], "tpot"))
    summary.update(_stats([g for r in ok for g in r.itl], "itl"))
    summary.update(_stats([r.e2el for r in ok], "e2el"))
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error] = errors.get(r.error, 0) + 1
    summary["errors"] = errors
    return summary


def format_table(summary: dict[str, Any], max_concurrency: int | None, request_rate: float) -> str:
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]
    row = lambda k, v: lines.append(f"{k:<40}{v:<10}")  # noqa: E731
    row("Maximum request concurrency:", "inf" if max_concurrency is None else max_concurrency)
    row("Request rate (req/s):", "inf" if math.isinf(request_rate) else f"{request_rate:g}")
    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", f"{summary['duration_s']:.2f}")
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", f"{summary['request_throughput']:.2f}")
    row("Input token throughput (tok/s):", f"{summary['input_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{summary['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{summary['total_token_throughput']:.2f}")
    for m in METRICS:
        lines.append("{s:{c}^{n}}".format(s=f" {METRIC_TITLES[m]} ", n=w, c="-"))
        row(f"Mean {m.upper()} (ms):", fmt(summary[f"mean_{m}_ms"]))
        row(f"Median {m.upper()} (ms):", fmt(summary[f"median_{m}_ms"]))
        row(f"P99 {m.upper()} (ms):", fmt(summary[f"p99_{m}_ms"]))
    lines.append("=" * w)
    for err, n in list(summary["errors"].items())[:5]:
        lines.append(f"{n} failed: {err}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- runs


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_model(base_url: str, api_key: str | None, timeout: float = 30.0) -> str:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(base_url + "/v1/models", headers=_headers(api_key)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {base_url}/v1/models returned HTTP {resp.status}: {(await resp.text())[:300]}")
            data = (await resp.json()).get("data") or []
    if not data:
        raise RuntimeError(f"GET {base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]


async def run_once(requests: list[SampleRequest], *, url: str, model: str, endpoint: str, api_key: str | None,
                   request_rate: float, max_concurrency: int | None, seed: int, temperature: float,
                   ignore_eos: bool, request_timeout: float, max_run_time: float | None,
                   extra_body: dict[str, Any] | None = None) -> tuple[list[RequestResult], float]:
    """Send every request once (Poisson arrivals at `request_rate`, at most `max_concurrency` in
    flight); returns the per-request results and the run's duration in seconds."""
    import aiohttp

    headers = _headers(api_key)
    extra = extra_body or {}
    rng = np.random.default_rng(seed)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limit = max(max_concurrency or 0, len(requests), 1)
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    results: list[RequestResult | None] = [None] * len(requests)

    async with aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20) as session:
        t0 = time.perf_counter()

        async def one(i: int, req: SampleRequest) -> None:
            body = _payload(req, model, endpoint, temperature, ignore_eos, extra)
            if semaphore is None:
                results[i] = await send_request(session, url, headers, body, i, req.prompt_len, t0, request_timeout)
            else:
                async with semaphore:
                    results[i] = await send_request(session, url, headers, body, i, req.prompt_len, t0,
                                                    request_timeout)

        async def launch() -> list[asyncio.Task]:
            tasks = []
            for i, req in enumerate(requests):
                tasks.append(asyncio.create_task(one(i, req)))
                if not math.isinf(request_rate) and i + 1 < len(requests):
                    await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))
            return tasks

        tasks: list[asyncio.Task] = []

        async def drive() -> None:
            tasks.extend(await launch())
            await asyncio.gather(*tasks)

        driver = asyncio.create_task(drive())
        try:
            await asyncio.wait_for(asyncio.shield(driver), max_run_time)
        except asyncio.TimeoutError:
            driver.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(driver, *tasks, return_exceptions=True)
        duration = time.perf_counter() - t0

    for i, r in enumerate(results):
        if r is None:  # never started, or cancelled before send_request could record it
            results[i] = RequestResult(index=i, prompt_len=requests[i].prompt_len,
                                       error="cancelled: the run reached --max-run-time")
    return results, duration  # type: ignore[return-value]


def _parse_list(text: str, conv, name: str) -> list:
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("inf", "none", "0") and name == "--max-concurrency":
            out.append(None)
            continue
        try:
            value = conv(part)
        except ValueError:
            raise ValueError(f"{name}: cannot parse {part!r}") from None
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {part}")
        out.append(value)
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def _parse_metadata(items: list[str] | None) -> dict[str, str]:
    """--metadata KEY=VALUE ...: what the client cannot see, such as the server's flags."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def build_requests(args: argparse.Namespace, seed: int, num_prompts: int) -> list[SampleRequest]:
    tokenizer = _load_tokenizer(args.tokenizer)
    if args.dataset == "random":
        try:
            lo, hi = (int(x) for x in args.random_token_range.split(","))
        except ValueError:
            raise ValueError(f"--random-token-range must be LOW,HIGH; got {args.random_token_range!r}") from None
        if not 0 <= lo < hi:
            raise ValueError(f"--random-token-range needs 0 <= LOW < HIGH; got {args.random_token_range!r}")
        return random_requests(num_prompts, args.input_len, args.output_len, seed=seed,
                               range_ratio=args.range_ratio, tokenizer=tokenizer,
                               as_text=tokenizer is not None or args.endpoint == CHAT, token_range=(lo, hi))
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE")
        return sharegpt_requests(args.dataset_path, num_prompts, args.output_len, seed=seed, tokenizer=tokenizer)
    raise ValueError(f"unknown --dataset {args.dataset!r}")


def _validate(args: argparse.Namespace) -> None:
    """Argument errors surface before any network traffic."""
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.request_timeout <= 0 or (args.max_run_time is not None and args.max_run_time <= 0):
        raise ValueError("--request-timeout and --max-run-time must be positive")
    if args.prompts_per_concurrency is not None and args.prompts_per_concurrency < 1:
        raise ValueError("--prompts-per-concurrency must be >= 1")
    if args.num_warmups < 0:
        raise ValueError("--num-warmups must be >= 0")
    if args.dataset == "sharegpt" and not args.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE")
    if args.dataset_path and not os.path.isfile(args.dataset_path):
        raise ValueError(f"--dataset-path {args.dataset_path} is not a file")
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as e:
            raise ValueError(f"--extra-body is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}
    cfg["request_rate_list"] = [None if math.isinf(r) else r for r in args.request_rate_list]  # JSON has no inf
    cfg.pop("api_key", None)  # never write a secret into a result file
    return cfg


def _request_record(result: RequestResult, output_len_requested: int, detailed: bool) -> dict[str, Any]:
    """One request's numbers for the result file; its per-token gaps only when detailed (they make
    a 256-request run's file megabytes long)."""
    record = {**asdict(result), "tpot": result.tpot, "output_len_requested": output_len_requested}
    if not detailed:
        del record["itl"]
    return record


async def _benchmark(args: argparse.Namespace, out=None) -> dict[str, Any]:
    out = out or sys.stdout
    base = args.base_url.rstrip("/")
    model = args.model or await fetch_model(base, args.api_key)
    endpoint = args.endpoint if args.endpoint.startswith("/") else "/" + args.endpoint
    url = base + endpoint
    extra = json.loads(args.extra_body) if args.extra_body else {}
    common = dict(url=url, model=model, endpoint=endpoint, api_key=args.api_key, temperature=args.temperature,
                  ignore_eos=not args.no_ignore_eos, request_timeout=args.request_timeout, extra_body=extra)

    for w in range(args.num_warmups):
        # Prompts of their own (another seed), so no measured request finds its prefix cached.
        warm_req = build_requests(args, seed=args.seed + 1_000_003 + w, num_prompts=1)
        if isinstance(warm_req[0].prompt, str):  # a ShareGPT prompt may also be a measured one
            warm_req[0].prompt = f"Warm-up {w}. " + warm_req[0].prompt
        warm, _ = await run_once(warm_req, request_rate=math.inf, max_concurrency=None, seed=args.seed,
                                 max_run_time=args.request_timeout, **common)
        if not warm[0].success:
            raise RuntimeError(f"warm-up request to {url} failed: {warm[0].error}")

    runs = []
    sweep = [(c, r) for c in args.max_concurrency_list for r in args.request_rate_list]
    for k, (concurrency, rate) in enumerate(sweep):
        # Random prompts: run k uses seed + k, so a sweep never re-sends prompts the server has cached.
        seed = args.seed + k if args.dataset == "random" else args.seed
        num_prompts = args.num_prompts
        if args.prompts_per_concurrency and concurrency:
            # Keep a sweep affordable: a few waves at low concurrency, --num-prompts at most.
            num_prompts = min(num_prompts, args.prompts_per_concurrency * concurrency)
        requests = build_requests(args, seed=seed, num_prompts=num_prompts)
        print(f"model {model} at {url}: {len(requests)} requests, request rate "
              f"{'inf' if math.isinf(rate) else rate}, max concurrency {concurrency or 'inf'}", file=out)
        results, duration = await run_once(requests, request_rate=rate, max_concurrency=concurrency,
                                           seed=args.seed, max_run_time=args.max_run_time, **common)
        summary = summarize(results, duration)
        print(format_table(summary, concurrency, rate), file=out)
        runs.append({
            "max_concurrency": concurrency,
            "dataset_seed": seed,
            "request_rate": None if math.isinf(rate) else rate,
            "summary": summary,
            "requests": [_request_record(r, requests[r.index].output_len, args.save_detailed) for r in results],
        })
    return {"model": model, "url": url, "runs": runs}


def main(args: argparse.Namespace) -> int:
    """`braid bench serve`; returns 0 when every request of every run succeeded, 1 otherwise."""
    import aiohttp

    if args.api_key is None:
        args.api_key = os.environ.get("OPENAI_API_KEY")
    try:
        args.max_concurrency_list = _parse_list(args.max_concurrency, int, "--max-concurrency") \
            if args.max_concurrency is not None else [None]
        args.request_rate_list = _parse_list(args.request_rate, float, "--request-rate")
        metadata = _parse_metadata(args.metadata)
        _validate(args)
        result = asyncio.run(_benchmark(args))
    except (ValueError, RuntimeError, OSError, aiohttp.ClientError) as e:
        print(f"braid bench serve: error: {e}", file=sys.stderr)
        return 2
    from braid.bench.run_info import run_info, write_result

    result = {"benchmark": "serve", "config": _config(args), "metadata": metadata, "run_info": run_info(), **result}
    if args.result_json:
        write_result(args.result_json, result)
        print(f"wrote {args.result_json}")
    if args.plot:
        from braid.bench.plot import plot_runs

        plot_runs({result["model"]: result["runs"]}, args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(r["summary"]["failed"] == 0 for r in result["runs"]) else 1


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: %(default)s)")
    parser.add_argument("--endpoint", default=COMPLETIONS, choices=[COMPLETIONS, CHAT])
    parser.add_argument("--model", default=None, help="served model name (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", default=None, help="Bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--dataset", default="random", choices=["random", "sharegpt"])
    parser.add_argument("--dataset-path", default=None, help="ShareGPT JSON file")
    parser.add_argument("--tokenizer", default=None,
                        help="HF folder or .gguf: random prompts become text, ShareGPT replies set output lengths")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--prompts-per-concurrency", type=int, default=None,
                        help="in a --max-concurrency sweep, send min(--num-prompts, this x concurrency) per run")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="random lengths drawn uniformly from [len*(1-r), len*(1+r)]")
    parser.add_argument("--random-token-range", default="20,256",
                        help="LOW,HIGH: random prompt token ids without --tokenizer (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-rate", default="inf",
                        help="Poisson arrival rate in req/s (default inf: all at once); comma list = sweep")
    parser.add_argument("--max-concurrency", default=None,
                        help="at most this many requests in flight; comma list (e.g. 1,16,64) = sweep")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos: true")
    parser.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    parser.add_argument("--num-warmups", type=int, default=1,
                        help="requests sent (and not counted) before measuring; a failed one stops the benchmark")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-run-time", type=float, default=3600.0,
                        help="seconds per run; requests still going then are cancelled and counted as failed")
    parser.add_argument("--result-json", default=None, help="write config, summary and per-request numbers")
    parser.add_argument("--save-detailed", action="store_true",
                        help="also write every request's inter-token gaps to --result-json")
    parser.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recorded in the result JSON: what this client cannot see, e.g. the server's flags")
    parser.add_argument("--plot", default=None, help="PNG of latency percentiles and throughput across the sweep")
    return parser


if __name__ == "__main__":
    p = add_cli_args(argparse.ArgumentParser(prog="braid bench serve", description=__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    sys.exit(main(p.parse_args()))
