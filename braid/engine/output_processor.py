"""Frontend side of outputs: detokenize, apply stop strings, assemble logprobs,
time each request, and fold the n samples of one prompt into one RequestOutput."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from braid.engine.detokenizer import IncrementalDetokenizer
from braid.engine.messages import EngineCoreOutput, TokenLogprobs
from braid.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput
from braid.sampling_params import SamplingParams


@dataclass
class SampleState:
    """One of the n samples of a request; it is its own request in the engine core."""

    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def visible_text(self) -> str:
        """The text so far, holding back a tail that could still grow into a stop string,
        so a stream never shows characters that the stop string later removes."""
        text = self.detokenizer.output_text
        if self.finish_reason is None and self.params.stop and not self.params.include_stop_str_in_output:
            holdback = max(len(s) for s in self.params.stop) - 1
            return text[: max(0, len(text) - holdback)]
        return text

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.visible_text(),
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: dict[str, SampleState]  # core request id -> sample
    metrics: RequestMetrics
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())

    def output(self) -> RequestOutput:
        ordered = sorted(self.samples.values(), key=lambda s: s.index)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            outputs=[s.completion() for s in ordered],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics,
        )


def sample_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{index}_{request_id}"


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._sample_owner: dict[str, str] = {}  # core request id -> user request id
        # Seconds since each request's previous tokens, one per request that got tokens in the
        # last process_outputs call after its first (vLLM's inter-token latency).
        self.inter_token_latencies: list[float] = []

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    sample_params: list[SamplingParams], arrival_time: float | None = None) -> list[str]:
        """Register a request with one SamplingParams per sample; returns the core request ids."""
        n = len(sample_params)
        core_ids = [sample_request_id(request_id, i, n) for i in range(n)]
        if request_id in self.requests or any(c in self._sample_owner for c in core_ids):
            raise ValueError(f"request id {request_id!r} is already in use")
        samples = {}
        for index, params in enumerate(sample_params):
            core_id = core_ids[index]
            samples[core_id] = SampleState(
                index=index,
                params=params,
                detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            self._sample_owner[core_id] = request_id
        first = sample_params[0]
        self.requests[request_id] = RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids),
            samples=samples,
            metrics=RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.time()),
            prompt_logprobs=[None] if first.prompt_logprobs is not None else None,
        )
        return list(samples)

    def owns(self, core_request_id: str) -> bool:
        """Whether outputs for this engine request are still wanted."""
        return core_request_id in self._sample_owner

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a user request; returns the core ids still to abort in the engine."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        for core_id in state.samples:
            self._sample_owner.pop(core_id, None)
        return [cid for cid, s in state.samples.items() if s.finish_reason is None]

    def process_outputs(self, outputs: list[EngineCoreOutput], final_only: bool = False,
                        schedule_times: dict[str, tuple[float, float]] | None = None
                        ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the updated request outputs (only the finished ones with final_only: a caller
        that waits for whole results skips a snapshot of every request every step), and core
        ids to abort (a stop string was met). schedule_times: the core's (received, first
        scheduled) of requests reporting for the first time (EngineCoreOutputs')."""
        now, now_ts = time.time(), time.monotonic()
        self.inter_token_latencies = []
        updated: dict[str, RequestState] = {}
        to_abort: list[str] = []
        for out in outputs:
            owner = self._sample_owner.get(out.request_id)
            if owner is None:
                continue
            state = self.requests[owner]
            sample = state.samples[out.request_id]
            if sample.finish_reason is not None:  # already cut by a stop string
                continue
            if out.new_prompt_logprobs and state.prompt_logprobs is not None and sample.index == 0:
                state.prompt_logprobs.extend(self._logprob_dicts(out.new_prompt_logprobs))
            state.num_cached_tokens = out.num_cached_tokens
            m = state.metrics
            if schedule_times and out.request_id in schedule_times:
                queued, scheduled = schedule_times[out.request_id]
                if m.scheduled_ts is None or scheduled < m.scheduled_ts:  # the first of its samples
                    m.queued_ts, m.scheduled_ts = queued, scheduled
            if out.new_token_ids:
                if m.first_token_ts is None:
                    m.first_token_time, m.first_token_ts = now, now_ts
                elif m.last_token_ts != now_ts:  # the request's first sample in this step
                    self.inter_token_latencies.append(now_ts - m.last_token_ts)
                m.last_token_ts = now_ts
                m.num_generation_tokens += len(out.new_token_ids)
                stopped = self._append(sample, out)
                m.max_sample_tokens = max(m.max_sample_tokens, len(sample.token_ids))
                if stopped and out.finish_reason is None:
                    to_abort.append(out.request_id)
            if out.finish_reason is not None and sample.finish_reason is None:
                sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
            updated[owner] = state
        results = []
        for owner, state in updated.items():
            finished = state.finished
            if finished:
                state.metrics.finished_time = now
                del self.requests[owner]
                for core_id in state.samples:
                    self._sample_owner.pop(core_id, None)
            if finished or not final_only:
                results.append(state.output())
        return results, to_abort

    def _append(self, sample: SampleState, out: EngineCoreOutput) -> bool:
        """Add new tokens to a sample; True when a stop string finished it here."""
        params = sample.params
        sample.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None and sample.logprobs is not None:
            for entry in out.new_logprobs:
                sample.logprobs.append(self._logprob_dict(entry))
                sample.cumulative_logprob += entry[1][0]
        text_ids = out.new_token_ids
        stopped_on_token = out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
        if stopped_on_token and not params.include_stop_str_in_output:
            text_ids = text_ids[:-1]  # the EOS / stop token itself adds no text
        added = sample.detokenizer.add_tokens(text_ids)
        if len(sample.token_ids) <= params.min_tokens:
            return False  # min_tokens holds stop strings back too (as vLLM: only text added after them counts)
        stop_str = sample.detokenizer.check_stop_strings(params.stop, len(added), params.include_stop_str_in_output)
        if stop_str is not None:
            sample.finish_reason, sample.stop_reason = "stop", stop_str
            return True
        return False

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        ids, lps, rank = entry
        result = {ids[0]: Logprob(lps[0], rank, self.tokenizer.decode([ids[0]]))}
        for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
            if tid not in result:
                result[tid] = Logprob(lp, r, self.tokenizer.decode([tid]))
        return result

    def _logprob_dicts(self, entries: list[TokenLogprobs]) -> list[dict[int, Logprob]]:
        return [self._logprob_dict(e) for e in entries]
