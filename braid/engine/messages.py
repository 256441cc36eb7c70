"""Plain data crossing the frontend <-> engine-core boundary.

Dataclasses of primitives, so they serialize with msgspec when the core runs
in its own process; never pickled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from braid.sampling_params import SamplingParams

# (token ids, logprobs, rank of the chosen token); ids[0] is the chosen token.
TokenLogprobs = tuple[list[int], list[float], int]


@dataclass
class EngineCoreRequest:
    """A tokenized, validated request."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.time)


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    # Prompt logprobs for the prompt positions computed this step (the first position has none).
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    # Tokens sampled for requests that had already finished (async/multi-step lookahead).
    num_wasted_tokens: int = 0


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput] = field(default_factory=list)
    stats: SchedulerStats | None = None
    # Request id -> (received, first scheduled) on the core's monotonic clock, for requests
    # whose first output this is: one entry per request, not two fields on every output.
    schedule_times: dict[str, tuple[float, float]] | None = None

    @staticmethod
    def combine(parts: list["EngineCoreOutputs"], stats: SchedulerStats | None) -> "EngineCoreOutputs":
        outputs, times = [], {}
        for part in parts:
            outputs += part.outputs
            times.update(part.schedule_times or {})
        return EngineCoreOutputs(outputs, stats, times or None)
