"""AsyncLLM: the serving frontend. Tokenizes and validates in this process,
runs EngineCore in its own process, and turns its outputs into a stream of
RequestOutputs per request, detokenized incrementally here.

    llm = AsyncLLM.from_engine_args(EngineArgs(...))
    async for output in llm.generate(prompt, SamplingParams(...), request_id):
        ...  # cumulative RequestOutput; the last has finished=True
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from braid.engine import serialization as ser
from braid.engine.arg_utils import EngineArgs
from braid.engine.core_client import EngineCoreClient
from braid.engine.input_processor import InputProcessor, PromptType
from braid.engine.llm_engine import sample_params_for
from braid.engine.messages import EngineCoreRequest, SchedulerStats
from braid.engine.output_processor import OutputProcessor
from braid.errors import EngineDeadError
from braid.outputs import RequestOutput
from braid.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long a core seen exiting may still have its last message (its error) in the socket.
_LAST_WORDS_S = 0.5


class AsyncLLM:
    def __init__(self, engine_args: EngineArgs, metrics=None) -> None:
        from braid.transformers_utils import get_eos_token_ids, load_tokenizer

        self.engine_args = engine_args
        # The frontend needs the model's config and tokenizer, never its weights.
        self.config = engine_args.create_engine_config()
        model_config = self.config.model
        self.tokenizer = load_tokenizer(model_config.model, model_config.tokenizer)
        eos = get_eos_token_ids(model_config.model, model_config.hf_config, self.tokenizer)
        self.input_processor = InputProcessor(self.tokenizer, model_config.max_model_len, model_config.vocab_size, eos,
                                              model_config.max_logprobs)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.metrics = metrics
        self.latest_stats = SchedulerStats()
        self.client = EngineCoreClient(engine_args)
        self._queues: dict[str, asyncio.Queue] = {}
        self._prompt_counted: set[str] = set()
        self._output_task: asyncio.Task | None = None
        self._utility_futures: dict[int, asyncio.Future] = {}
        self._next_call_id = 0
        self.dead_reason: str | None = None
        self._dead: asyncio.Event | None = None  # made on the serving loop
        self._exit_task: asyncio.Task | None = None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, metrics=None) -> "AsyncLLM":
        return cls(engine_args, metrics)

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None or not self.client.is_alive

    def check_health(self) -> None:
        if self.is_dead:
            raise EngineDeadError(self.dead_reason or "the engine core process is not running")

    # ---- requests --------------------------------------------------------------------
    def _ensure_output_task(self) -> None:
        if self._output_task is None:
            loop = asyncio.get_running_loop()
            self._dead = asyncio.Event()
            self._output_task = loop.create_task(self._output_loop())
            loop.add_reader(self.client.sentinel, self._on_core_exit)

    def validate(self, request_id: str, prompt: PromptType, sampling_params: SamplingParams) -> None:
        """Raise the ValueError generate() would raise for this input, without queuing anything."""
        self.input_processor.process(request_id, prompt, sampling_params)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs of one request. Raises ValueError on bad input (nothing
        queued), EngineDeadError if the engine dies. Cancelling the consumer aborts the request."""
        self._ensure_output_task()
        self.check_health()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, core_request = self.input_processor.process(request_id, prompt, sampling_params)
        samples = sample_params_for(core_request.sampling_params)
        core_ids = self.output_processor.add_request(request_id, text, core_request.prompt_token_ids, samples,
                                                     core_request.arrival_time)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            for core_id, sample in zip(core_ids, samples):
                await self._send(ser.ADD, EngineCoreRequest(core_id, core_request.prompt_token_ids, sample,
                                                            core_request.arrival_time))
            while not finished:
                item = await queue.get()
                # Outputs are cumulative: when the consumer lags, only the newest matters.
                while not queue.empty() and not isinstance(item, BaseException) and not item.finished:
                    item = queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            self._prompt_counted.discard(request_id)
            if not finished:  # cancelled, disconnected or failed: free its KV blocks
                await self._abort_quietly(request_id)

    async def abort(self, request_id: str) -> None:
        await self._abort_quietly(request_id)
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    async def _abort_quietly(self, request_id: str) -> None:
        core_ids = self.output_processor.abort_request(request_id)
        if core_ids and self.metrics is not None:  # the core's own abort output finds no owner here any more
            self.metrics.record_aborted(len(core_ids))
        if core_ids and not self.is_dead:
            await self._send(ser.ABORT, core_ids)

    async def call_utility(self, method: str):
        """Run one of EngineCoreProc.UTILITY_METHODS in the core and return its result."""
        self._ensure_output_task()
        self.check_health()
        self._next_call_id += 1
        future = asyncio.get_running_loop().create_future()
        self._utility_futures[self._next_call_id] = future
        await self._send(ser.UTILITY, ser.UtilityCall(self._next_call_id, method))
        return await future

    async def _send(self, kind: bytes, body) -> None:
        """Send to the core, or raise EngineDeadError if it dies first (a send to a dead peer can block)."""
        send = asyncio.ensure_future(self.client.send(kind, body))
        dead = asyncio.ensure_future(self._dead.wait())
        done, _ = await asyncio.wait({send, dead}, return_when=asyncio.FIRST_COMPLETED)
        if send not in done:
            send.cancel()
            raise EngineDeadError(self.dead_reason or "the engine core process is not running")
        dead.cancel()
        send.result()

    # ---- outputs from the core --------------------------------------------------------
    async def _output_loop(self) -> None:
        try:
            while True:
                kind, body = await self.client.recv()
                if kind == ser.OUTPUTS:
                    await self._process_outputs(body)
                elif kind == ser.UTILITY_RESULT:
                    future = self._utility_futures.pop(body.call_id, None)
                    if future is not None and not future.done():
                        if body.error:
                            future.set_exception(ValueError(body.error))
                        else:
                            future.set_result(body.result)
                elif kind == ser.ERROR:
                    self._fail_all(f"the engine core failed: {body}")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - never leave requests hanging
            logger.exception("output loop failed")
            self._fail_all(f"the frontend output loop failed: {e}")

    async def _process_outputs(self, core_outputs) -> None:
        if core_outputs.stats is not None:
            self.latest_stats = core_outputs.stats
            if self.metrics is not None:
                self.metrics.record_stats(core_outputs.stats)
        new_generation = sum(len(o.new_token_ids) for o in core_outputs.outputs
                             if self.output_processor.owns(o.request_id))
        outputs, to_abort = self.output_processor.process_outputs(core_outputs.outputs,
                                                                  schedule_times=core_outputs.schedule_times)
        if self.metrics is not None:
            self.metrics.record_inter_token_latencies(self.output_processor.inter_token_latencies)
        if to_abort:
            await self._send(ser.ABORT, to_abort)
        new_prompt = 0
        for output in outputs:
            if output.request_id not in self._prompt_counted and any(c.token_ids for c in output.outputs):
                self._prompt_counted.add(output.request_id)
                new_prompt += len(output.prompt_token_ids)
            if output.finished and self.metrics is not None:
                self.metrics.record_finished(output)
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        if self.metrics is not None:
            self.metrics.record_tokens(new_prompt, new_generation)

    def _on_core_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.client.sentinel)
        self._exit_task = loop.create_task(self._fail_on_core_exit())  # referenced: a bare task may be collected

    async def _fail_on_core_exit(self) -> None:
        # A core that failed sent an ERROR naming the cause (say, the worker rank that died) just
        # before it exited, and the exit may be seen first: let the output loop read that message,
        # so the cause is what requests and /health report, not only "the core exited".
        try:
            await asyncio.wait_for(self._dead.wait(), _LAST_WORDS_S)
        except asyncio.TimeoutError:
            pass
        self.client.process.join(timeout=1.0)  # reaped, so the exit code is known
        self._fail_all(f"the engine core process exited (exit code {self.client.process.exitcode})")

    def _fail_all(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
            logger.error("%s", reason)
        if self._dead is not None:
            self._dead.set()
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(reason))
        for future in self._utility_futures.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._utility_futures.clear()

    def shutdown(self) -> None:
        if self._output_task is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.client.sentinel)
            except (RuntimeError, ValueError):
                pass
            self._output_task.cancel()
        self.client.shutdown()
