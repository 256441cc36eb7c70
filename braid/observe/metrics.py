"""Prometheus metrics of the serving engine, named like vLLM's (braid: prefix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from braid.engine.messages import SchedulerStats
from braid.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))  # 1, 2, 5, 10, ... 500000


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(f"braid:{name}", doc, labels, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(f"braid:{name}", doc, labels, registry=self.registry).labels(model_name)

        def histogram(name, doc, buckets=_LATENCY_BUCKETS):
            return Histogram(f"braid:{name}", doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.num_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.prefix_cache_hit_rate = gauge("prefix_cache_hit_rate", "Prefix cache hits / queries, in tokens.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Requests preempted (recomputed later).")
        self.wasted_tokens = counter(
            "wasted_tokens", "Tokens computed for requests that had already finished (multi-step / async lookahead).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = Counter("braid:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self._model_name = model_name
        for reason in ("stop", "length", "abort"):  # every series exists from the start, as vLLM's
            self._success.labels(model_name, reason)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's successive outputs "
                             "(one observation per request per step after its first token).")
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Per request: mean time per output token after the first.")
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.")
        self.queue_time = histogram("request_queue_time_seconds", "Time waiting in the engine before the first schedule.")
        self.prefill_time = histogram("request_prefill_time_seconds", "First schedule to first token.")
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token.")
        self.inference_time = histogram("request_inference_time_seconds", "First schedule to last token.")
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per finished request.",
                                               _TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request (all samples).", _TOKEN_COUNT_BUCKETS)
        self._last = SchedulerStats()

    def record_stats(self, stats: SchedulerStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        # The core reports running totals; counters take the increase.
        self.prefix_cache_queries.inc(max(0, stats.prefix_cache_queries - self._last.prefix_cache_queries))
        self.prefix_cache_hits.inc(max(0, stats.prefix_cache_hits - self._last.prefix_cache_hits))
        self.num_preemptions.inc(max(0, stats.num_preemptions - self._last.num_preemptions))
        self.wasted_tokens.inc(max(0, stats.num_wasted_tokens - self._last.num_wasted_tokens))
        if stats.prefix_cache_queries:
            self.prefix_cache_hit_rate.set(stats.prefix_cache_hits / stats.prefix_cache_queries)
        self._last = stats

    def record_inter_token_latencies(self, seconds: list[float]) -> None:
        for s in seconds:
            self.itl.observe(s)

    def record_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)

    def record_aborted(self, num_samples: int) -> None:
        """Samples of a request the client abandoned (disconnect, cancel) before they finished."""
        self._success.labels(self._model_name, "abort").inc(num_samples)

    def record_finished(self, output: RequestOutput) -> None:
        for completion in output.outputs:
            self._success.labels(self._model_name, completion.finish_reason or "abort").inc()
        self.request_prompt_tokens.observe(len(output.prompt_token_ids))
        m = output.metrics
        if m is None:
            return
        self.request_generation_tokens.observe(m.num_generation_tokens)
        for histogram, seconds in ((self.ttft, m.time_to_first_token), (self.tpot, m.time_per_output_token),
                                   (self.e2e, m.e2e_latency), (self.queue_time, m.queue_time),
                                   (self.prefill_time, m.prefill_time), (self.decode_time, m.decode_time),
                                   (self.inference_time, m.inference_time)):
            if seconds is not None:
                histogram.observe(seconds)
