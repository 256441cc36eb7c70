"""One token-budget scheduler in vLLM V1's model.

Each step hands out at most max_num_batched_tokens over running requests
first (oldest first), then waiting ones (FCFS). A request's share is simply
how many of its tokens are not yet computed, so long prompts are chunked and
decodes and prefills share a batch. When the KV pool runs dry the newest
running request is preempted: its blocks are freed and it is recomputed later.

Async scheduling: the next step is scheduled while the current one runs, so a
request that will sample a token this step is handed its next decode before the
token's id is known. That token is a placeholder
(`Request.num_output_placeholders`): it counts towards the request's length when
scheduling, the worker feeds it from the GPU, and the host learns its id when
the step reports back. A request whose pending tokens will certainly finish it
(max_tokens, max_model_len) is not scheduled again.

Multi-step (--num-scheduler-steps N): when a step holds only decodes and no
prompt is waiting to join, the batch runs up to N forward passes from this one
schedule: each request gets N-1 lookahead KV slots, its computed count and its
placeholders advance by N at once, and each pass reports back on its own.
"""
from __future__ import annotations

import logging
import time
from collections import deque

from braid.config import SchedulerConfig
from braid.core.kv_cache_manager import KVCacheManager
from braid.core.request import Request, RequestStatus
from braid.core.scheduler_output import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from braid.engine.messages import EngineCoreOutput, EngineCoreOutputs, SchedulerStats

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Finished since the last schedule(); the workers drop them next step.
        self._finished_ids: set[str] = set()
        # Preempted since the last schedule(): workers set them aside until they resume.
        self._preempted_ids: set[str] = set()
        self.num_preemptions = 0
        # Finished requests still held by steps in flight: their results are dropped (a new
        # request may reuse the id meanwhile). req_id -> steps still to report.
        self._stale_in_flight: dict[str, int] = {}
        # Unfinished requests whose sampling reads their generated tokens (penalties).
        self.num_needing_output_history = 0
        # Tokens sampled for requests already finished (lookahead of async / multi-step runs).
        self.num_wasted_tokens = 0

    # ---- requests in and out -------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if request.sampling_params.uses_penalties:
            self.num_needing_output_history += 1

    def abort_requests(self, request_ids) -> list[Request]:
        aborted = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            self._dequeue(request)
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            aborted.append(request)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _dequeue(self, request: Request, status: RequestStatus | None = None) -> None:
        """Take an unfinished request out of its queue (status: where it was, if since overwritten)."""
        if (status or request.status) == RequestStatus.RUNNING:
            self.running.remove(request)
        else:  # waiting, or preempted while a step that held it was in flight
            self.waiting.remove(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        self._finished_ids.add(request.request_id)
        del self.requests[request.request_id]
        if request.num_in_flight_steps:
            self._stale_in_flight[request.request_id] = request.num_in_flight_steps
        if request.sampling_params.uses_penalties:
            self.num_needing_output_history -= 1

    @property
    def max_running(self) -> int:
        return self.config.max_running_seqs

    # ---- scheduling ------------------------------------------------------------
    def _token_share(self, request: Request, budget: int) -> int:
        if self.config.pipeline_parallel_size > 1 and request.num_in_flight_steps:
            return 0  # its step is still in the pipeline
        if request.num_output_placeholders and self._finishes_with_pending(request):
            return 0
        n = request.num_tokens + request.num_output_placeholders - request.num_computed_tokens
        if self.config.long_prefill_token_threshold > 0:
            n = min(n, self.config.long_prefill_token_threshold)
        return min(n, budget)

    def defer(self, output: SchedulerOutput) -> None:
        """An empty schedule that will not be run: keep its news for the workers for the next one."""
        assert output.is_empty, "only an empty schedule can be deferred"
        self._finished_ids |= output.finished_req_ids
        self._preempted_ids |= output.preempted_req_ids

    def shrink_steps(self, output: SchedulerOutput, num_steps: int) -> None:
        """Run a multi-step batch for fewer passes (data-parallel replicas must agree on one
        count): its requests give back the passes' computed tokens and placeholders. Lookahead
        KV slots reserved for the dropped passes stay with their requests (used next step)."""
        drop = output.num_steps - num_steps
        assert 0 <= drop and num_steps >= 1, (output.num_steps, num_steps)
        for req_id in output.num_scheduled_tokens:
            request = self.requests[req_id]
            request.num_computed_tokens -= drop
            request.num_in_flight_steps -= drop
            request.num_output_placeholders -= drop
        output.num_steps = num_steps

    def _finishes_with_pending(self, request: Request) -> bool:
        """The tokens already in flight will end this request by length: schedule it no further."""
        params = request.sampling_params
        pending_outputs = request.num_output_tokens + request.num_output_placeholders
        pending_len = request.num_tokens + request.num_output_placeholders
        return ((params.max_tokens is not None and pending_outputs >= params.max_tokens)
                or pending_len >= self.config.max_model_len)

    def _pop_victim(self, first: int) -> Request | None:
        """The newest running request from index `first` on (the one being scheduled, at
        worst): its KV goes and it comes back later. With interleaved multi-step passes
        (pipeline parallelism) only one with no passes in flight: a pass launched after its
        blocks went to another request would compute from their KV (multi_step_passes.py)."""
        if not self.config.interleaves_passes:
            return self.running.pop()
        for j in range(len(self.running) - 1, first - 1, -1):
            if not self.running[j].num_in_flight_steps:
                return self.running.pop(j)
        return None

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_tokens_sent = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_ids.add(request.request_id)
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted_any = False

        # Running requests first, oldest first; preempt from the newest when blocks run out.
        # Under pipeline parallelism each micro-batch takes its share of them (at most
        # --max-num-seqs), so the stages stay busy with different requests.
        shares = self.config.num_micro_batches
        max_running_here = -(-len(self.running) // shares)
        i = 0
        while i < len(self.running) and budget > 0 and len(cached_reqs) < max_running_here:
            request = self.running[i]
            num_new = self._token_share(request, budget)
            if num_new <= 0:
                i += 1
                continue
            while True:
                new_block_ids = self.kv.allocate_slots(request, num_new)
                if new_block_ids is not None:
                    break
                victim = self._pop_victim(i)
                if victim is None:  # every candidate still has passes to launch
                    break
                self._preempt(victim)
                preempted_any = True
                if victim is request:
                    break
            if new_block_ids is None:
                break
            cached_reqs.append(
                CachedRequestData(
                    req_id=request.request_id,
                    new_token_ids=request.all_token_ids[request.num_tokens_sent :],
                    new_block_ids=new_block_ids,
                    num_computed_tokens=request.num_computed_tokens,
                )
            )
            request.num_tokens_sent = request.num_tokens
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            i += 1

        # Then waiting requests in arrival order, unless this step had to preempt.
        while (self.waiting and budget > 0 and not preempted_any and len(self.running) < self.max_running
               and len(num_scheduled) < self.config.max_num_seqs):
            request = self.waiting[0]
            if request.num_output_placeholders:  # preempted with a token still in flight
                break
            computed_blocks, num_cached = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            if self.config.long_prefill_token_threshold > 0:
                num_new = min(num_new, self.config.long_prefill_token_threshold)
            num_new = min(num_new, budget)
            new_block_ids = self.kv.allocate_slots(request, num_new, computed_blocks)
            if new_block_ids is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                self.kv.record_prefix_lookup(request.num_tokens, num_cached)
            if request.scheduled_ts is None:
                request.scheduled_ts = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=list(request.output_token_ids),
                    sampling_params=request.sampling_params,
                    block_ids=self.kv.block_ids(request.request_id),
                    num_computed_tokens=num_cached,
                )
            )
            request.num_tokens_sent = request.num_tokens
            num_scheduled[request.request_id] = num_new
            budget -= num_new

        num_steps = 1
        if not new_reqs and not preempted_any and cached_reqs:
            num_steps = self._reserve_multi_step(cached_reqs, num_scheduled)
        output = SchedulerOutput(
            num_steps=num_steps,
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=self._finished_ids,
            preempted_req_ids=self._preempted_ids,
        )
        self._finished_ids = set()
        self._preempted_ids = set()
        # The KV of the scheduled tokens counts as computed from now on; a request whose
        # every known and pending token is then computed samples one more (a placeholder).
        for req_id, n in num_scheduled.items():
            request = self.requests[req_id]
            if num_steps > 1:  # every request decodes: one token per pass, one sample each
                request.num_computed_tokens += num_steps
                request.num_in_flight_steps += num_steps
                request.num_output_placeholders += num_steps
                continue
            request.num_computed_tokens += n
            request.num_in_flight_steps += 1
            if request.num_computed_tokens >= request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1
        return output

    def _reserve_multi_step(self, cached_reqs: list[CachedRequestData], num_scheduled: dict[str, int]) -> int:
        """Passes this decode-only batch may run (1 = a plain step); reserves their lookahead slots."""
        n = self.config.num_scheduler_steps
        if n == 1 or self.num_needing_output_history:
            return 1
        if self.waiting and len(self.running) < self.max_running:
            return 1  # a prompt can join now: it runs as a single step first
        requests = [self.requests[c.req_id] for c in cached_reqs]
        for request in requests:
            pending_len = request.num_tokens + request.num_output_placeholders
            if num_scheduled[request.request_id] != 1 or request.num_computed_tokens + 1 < pending_len:
                return 1  # a prefill chunk is in the batch
            n = min(n, self.config.max_model_len - pending_len)  # the last pass's token must fit
        if n < 2:
            return 1
        for cached, request in zip(cached_reqs, requests):
            extra = self.kv.allocate_slots(request, 1, num_lookahead_tokens=n - 1)
            if extra is None:  # no room to look ahead: plain steps (blocks taken so far stay, reported)
                return 1
            cached.new_block_ids = cached.new_block_ids + extra
        return n

    # ---- results ---------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> EngineCoreOutputs:
        outputs: list[EngineCoreOutput] = []
        schedule_times: dict[str, tuple[float, float]] | None = None
        for idx, req_id in enumerate(runner_output.req_ids):
            stale = self._stale_in_flight.get(req_id)
            if stale is not None:  # finished (aborted, stopped) while this step ran
                self.num_wasted_tokens += len(runner_output.sampled_token_ids[idx])
                if stale == 1:
                    del self._stale_in_flight[req_id]
                else:
                    self._stale_in_flight[req_id] = stale - 1
                continue
            request = self.requests[req_id]
            request.num_in_flight_steps -= 1
            prompt_lps = runner_output.prompt_logprobs.get(req_id)
            sampled = runner_output.sampled_token_ids[idx]
            request.num_output_placeholders = max(0, request.num_output_placeholders - len(sampled))
            queued_as = request.status  # RUNNING, or PREEMPTED after this step was launched
            new_tokens: list[int] = []
            for token_id in sampled:
                request.append_output_token(token_id)
                new_tokens.append(token_id)
                if self._check_stop(request, token_id):
                    break
            if not new_tokens and prompt_lps is None:
                continue
            lps = runner_output.logprobs[idx]
            if not request.timing_reported:
                request.timing_reported = True
                schedule_times = schedule_times or {}
                schedule_times[req_id] = (request.queued_ts, request.scheduled_ts)
            outputs.append(
                EngineCoreOutput(
                    request_id=req_id,
                    new_token_ids=new_tokens,
                    new_logprobs=lps[: len(new_tokens)] if lps is not None else None,
                    new_prompt_logprobs=prompt_lps,
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                )
            )
            if request.is_finished():
                self._dequeue(request, queued_as)
                self._finish(request, request.status)
        return EngineCoreOutputs(outputs=outputs, stats=self.make_stats(), schedule_times=schedule_times)

    def _check_stop(self, request: Request, token_id: int) -> bool:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens and token_id in request.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
            return True
        max_tokens = params.max_tokens if params.max_tokens is not None else float("inf")
        if request.num_output_tokens >= max_tokens or request.num_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def make_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage(),
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            num_preemptions=self.num_preemptions,
            num_wasted_tokens=self.num_wasted_tokens,
        )
