"""Scheduler-side state of one request.

Prefill and decode are not phases: a request simply has tokens whose KV is
not yet computed (num_tokens - num_computed_tokens), and the scheduler hands
out a token budget over them.
"""
from __future__ import annotations

import enum
import functools
import time

from braid.engine.messages import EngineCoreRequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    def __init__(self, core_request: EngineCoreRequest, block_size: int, received_ts: float | None = None) -> None:
        self.request_id = core_request.request_id
        self.prompt_token_ids = list(core_request.prompt_token_ids)
        self.sampling_params = core_request.sampling_params
        self.arrival_time = core_request.arrival_time
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit length at first schedule; -1 until then
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Tokens the worker already holds for this request (the rest are sent as a diff).
        self.num_tokens_sent = 0
        self.block_size = block_size
        self.block_hashes: list[bytes] = []  # filled by the KV cache manager
        # Async scheduling: tokens scheduled to be sampled whose ids have not come back yet,
        # and steps holding this request that have not reported back yet.
        self.num_output_placeholders = 0
        self.num_in_flight_steps = 0
        # Monotonic: received (by the core process's input thread, which may be while a long
        # step runs) or else taken in; first scheduled. Sent to the front end once.
        self.queued_ts = received_ts if received_ts is not None else time.monotonic()
        self.scheduled_ts: float | None = None
        self.timing_reported = False

    @functools.cached_property
    def stop_token_ids(self) -> set[int]:
        """EOS (unless ignored) and stop_token_ids; checked for every sampled token, so built once."""
        return self.sampling_params.all_stop_token_ids()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
