"""What the scheduler tells the workers to run in one step: plain data, diffs only.

A worker keeps its own copy of each running request; new requests arrive
whole, running ones only as what changed since the last step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from braid.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    # Tokens beyond the prompt already generated (a request resumed after preemption).
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    req_id: str
    new_token_ids: list[int]  # tokens appended since the worker last saw the request
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # req_id -> tokens to compute this step, in batch order.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the workers must forget (finished or aborted).
    finished_req_ids: set[str] = field(default_factory=set)
    # Requests preempted this step: their KV is gone and they come back later as new
    # requests, but workers keep their sampling state (a seeded generator continues).
    preempted_req_ids: set[str] = field(default_factory=set)
    # Multi-step: decode-only batches run this many forward passes (one token each per
    # request), the sampled ids feeding the next pass on the device.
    num_steps: int = 1
    # Which launched batch this is (the engine core counts them): interleaved multi-step
    # passes (pipeline parallelism) name their batch by it.
    batch_id: int = 0

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    # Per request, in req_ids order: the sampled tokens (empty for a partial prefill).
    sampled_token_ids: list[list[int]]
    # Per request: per sampled token, (token ids, logprobs, rank of the sampled token);
    # ids[0] is the sampled token. None when the request asked for no logprobs.
    logprobs: list[list[tuple[list[int], list[float], int]] | None]
    # req_id -> per prompt position computed this step: (ids, logprobs, rank of the prompt token).
    prompt_logprobs: dict[str, list[tuple[list[int], list[float], int]]] = field(default_factory=dict)
