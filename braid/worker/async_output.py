"""A step's sampled tokens on their way to the host.

The model runner launches a step and returns at once; the sampled ids (and
logprobs) are copied into pinned host memory on a side stream once the step has
sampled, and one event marks their arrival. `result()` waits for that event
only, so the host can schedule and launch more work meanwhile, and the copies
never sit between two passes of a multi-step run on the compute stream.
"""
from __future__ import annotations

import torch

from braid.core.scheduler_output import ModelRunnerOutput
from braid.layers.sampler import LogprobsTensors
from braid.worker.logprobs import to_token_logprobs


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class AsyncModelRunnerOutput:
    def __init__(self, req_ids: list[str], sampled_rows: list[int], sampled: torch.Tensor | None,
                 logprobs: LogprobsTensors | None, logprobs_wanted: list[int | None], prompt_logprobs: dict,
                 copy_stream: torch.cuda.Stream | None = None) -> None:
        self.req_ids = req_ids
        self.sampled_rows = sampled_rows  # batch row of each sampled token, in order
        self.logprobs_wanted = logprobs_wanted  # per sampled token: how many logprobs its request asked for
        self.prompt_logprobs = prompt_logprobs
        self._ready = None
        on_gpu = sampled is not None and sampled.device.type == "cuda"
        if on_gpu and copy_stream is not None:
            sampled_at = torch.cuda.Event()
            sampled_at.record()
            copy_stream.wait_event(sampled_at)
            device_tensors = [sampled] + ([logprobs.token_ids, logprobs.logprobs, logprobs.ranks] if logprobs else [])
            for t in device_tensors:
                t.record_stream(copy_stream)  # not reused before the copy has read it
            with torch.cuda.stream(copy_stream):
                self._copy(sampled, logprobs)
                self._ready = torch.cuda.Event()
                self._ready.record()
        else:
            self._copy(sampled, logprobs)
            if on_gpu:
                self._ready = torch.cuda.Event()
                self._ready.record()
        self._result: ModelRunnerOutput | None = None

    def _copy(self, sampled: torch.Tensor | None, logprobs: LogprobsTensors | None) -> None:
        self._sampled = _to_host(sampled) if sampled is not None else None
        self._logprobs = (LogprobsTensors(_to_host(logprobs.token_ids), _to_host(logprobs.logprobs),
                                          _to_host(logprobs.ranks)) if logprobs is not None else None)

    @classmethod
    def empty(cls) -> "AsyncModelRunnerOutput":
        return cls([], [], None, None, [], {})

    def result(self) -> ModelRunnerOutput:
        """Wait for this step's tokens to reach the host; plain lists per request."""
        if self._result is not None:
            return self._result
        if self._ready is not None:
            self._ready.synchronize()
        n = len(self.req_ids)
        sampled: list[list[int]] = [[] for _ in range(n)]
        logprobs: list = [None] * n
        if self._sampled is not None:
            token_ids = self._sampled.tolist()
            per_row = to_token_logprobs(self._logprobs) if self._logprobs is not None else None
            for j, row in enumerate(self.sampled_rows):
                sampled[row] = [token_ids[j]]
                wanted = self.logprobs_wanted[j]
                if wanted is not None and per_row is not None:
                    ids, lps, rank = per_row[j]
                    logprobs[row] = [(ids[: wanted + 1], lps[: wanted + 1], rank)]
        self._result = ModelRunnerOutput(req_ids=self.req_ids, sampled_token_ids=sampled, logprobs=logprobs,
                                         prompt_logprobs=self.prompt_logprobs)
        return self._result
