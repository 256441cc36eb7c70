"""Prometheus metrics of the serving engine, named like vLLM's (braid: prefix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from braid.engine.messages import SchedulerStats
from braid.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(f"braid:{name}", doc, labels, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(f"braid:{name}", doc, labels, registry=self.registry).labels(model_name)

        def histogram(name, doc):
            return Histogram(f"braid:{name}", doc, labels, buckets=_LATENCY_BUCKETS,
                             registry=self.registry).labels(model_name)

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
        m = output.metrics
        if m is None:
            return
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        if m.time_per_output_token is not None:
            self.tpot.observe(m.time_per_output_token)
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)
