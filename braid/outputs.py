"""What the offline API and the server hand back to users (vLLM's shapes)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per token: token id -> Logprob (the chosen token plus the top-n).
SampleLogprobs = list[dict[int, Logprob]]
# The first prompt token has no logprob (None).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timing of one request (vLLM's clocks). TTFT and end-to-end latency are wall-clock
    (time.time()) from arrival_time, which a caller may give; every other interval is taken on
    monotonic clocks (*_ts), which a wall-clock adjustment cannot bend: the front end's for the
    tokens, the engine core's for queueing (same host: one system-wide monotonic clock)."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    queued_ts: float | None = None  # the engine core received the request
    scheduled_ts: float | None = None  # the engine core first scheduled it
    first_token_ts: float | None = None
    last_token_ts: float | None = None
    num_generation_tokens: int = 0  # over all of the request's samples
    max_sample_tokens: int = 0  # of its longest sample: n samples advance together, one token each per step

    @staticmethod
    def _between(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else end - start

    @property
    def time_to_first_token(self) -> float | None:
        return self._between(self.arrival_time, self.first_token_time)

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between output tokens after the first."""
        decode = self.decode_time
        return None if decode is None or self.max_sample_tokens < 2 else decode / (self.max_sample_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        return self._between(self.arrival_time, self.finished_time)

    @property
    def queue_time(self) -> float | None:
        """Waiting in the engine core before its first schedule."""
        return self._between(self.queued_ts, self.scheduled_ts)

    @property
    def prefill_time(self) -> float | None:
        """First schedule to first token."""
        return self._between(self.scheduled_ts, self.first_token_ts)

    @property
    def decode_time(self) -> float | None:
        """First token to last token."""
        return self._between(self.first_token_ts, self.last_token_ts)

    @property
    def inference_time(self) -> float | None:
        """First schedule to last token: prefill plus decode."""
        return self._between(self.scheduled_ts, self.last_token_ts)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = field(default=None, repr=False)
