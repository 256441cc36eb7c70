"""The synchronous engine behind the offline API: frontend processing and an
in-process EngineCore, stepped by the caller."""
from __future__ import annotations

import dataclasses
import logging

from braid.config import EngineConfig
from braid.engine.arg_utils import EngineArgs
from braid.engine.core import make_engine_core
from braid.engine.input_processor import InputProcessor, PromptType
from braid.engine.messages import EngineCoreRequest, SchedulerStats
from braid.engine.output_processor import OutputProcessor
from braid.executor.worker_setup import WorkerError
from braid.outputs import RequestOutput
from braid.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def sample_params_for(params: SamplingParams) -> list[SamplingParams]:
    """n samples become n engine requests; seeded ones get seed, seed+1, ... so they differ."""
    if params.n == 1:
        return [params]
    def nth_seed(i: int) -> int | None:  # stays a 64-bit integer
        return None if params.seed is None else (params.seed + i + 2**63) % 2**64 - 2**63

    return [dataclasses.replace(params, n=1, seed=nth_seed(i)) for i in range(params.n)]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from braid.transformers_utils import get_eos_token_ids, load_tokenizer

        self.config = config
        self.tokenizer = load_tokenizer(config.model.model, config.model.tokenizer)
        eos = get_eos_token_ids(config.model.model, config.model.hf_config, self.tokenizer)
        self.engine_core = make_engine_core(config)
        self.input_processor = InputProcessor(
            self.tokenizer, config.model.max_model_len, config.model.vocab_size, eos, config.model.max_logprobs)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.last_stats: SchedulerStats | None = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Validate and queue a request; on bad input raise ValueError and change nothing."""
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, core_request = self.input_processor.process(request_id, prompt, params)
        samples = sample_params_for(core_request.sampling_params)
        core_ids = self.output_processor.add_request(request_id, text, core_request.prompt_token_ids, samples,
                                                     arrival_time)
        for core_id, sample in zip(core_ids, samples):
            self.engine_core.add_request(EngineCoreRequest(core_id, core_request.prompt_token_ids, sample,
                                                           core_request.arrival_time))

    def abort_request(self, request_ids: list[str]) -> None:
        core_ids = []
        for request_id in request_ids:
            core_ids.extend(self.output_processor.abort_request(request_id))
        self.engine_core.abort_requests(core_ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """The requests this step updated (final_only: only those it finished)."""
        try:
            core_outputs = self.engine_core.step()
        except WorkerError:
            # The survivors may wait forever in a collective on the dead worker, holding their
            # devices (and, under Ray, the placement group): stop them now, not at garbage collection.
            self.engine_core.kill_workers()
            self.engine_core.shutdown()
            raise
        self.last_stats = core_outputs.stats
        outputs, to_abort = self.output_processor.process_outputs(core_outputs.outputs, final_only,
                                                                   core_outputs.schedule_times)
        if to_abort:
            self.engine_core.abort_requests(to_abort)
        return outputs

    @property
    def kv_cache_manager(self):
        return self.engine_core.kv_cache_manager
