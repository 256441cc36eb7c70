"""EngineCore: owns the scheduler and the executor; one step() schedules,
runs the model and turns the result into per-request outputs.

Every step() reports one forward pass's tokens, in launch order. A batch is
scheduled and launched whole (a multi-step batch is several passes) and reported
pass by pass. With async scheduling up to two batches are in flight: batch t+1 is
scheduled and launched before batch t's tokens are awaited, so the host's
scheduling, input preparation and output processing overlap the device's work.

Multi-step under pipeline parallelism launches a batch's further passes one at a
time, interleaved with the other micro-batches' (each batch keeps up to
PASSES_AHEAD passes launched): a pass waits on the GPU for its batch's previous
pass to come round the pipeline, while the passes queued in between keep every
stage busy — and no host round trip sits between a batch's passes. A stage runs
its queue in order, so a waiting pass holds up everything queued behind it: a
batch launches a pass ahead of its last one's report only once every other share
has launched one since (round-robin), never two back to back.
"""
from __future__ import annotations

import functools
import logging
from collections import deque
from dataclasses import dataclass, field

from braid.config import EngineConfig
from braid.core.kv_cache_manager import KVCacheManager
from braid.core.request import Request
from braid.core.scheduler import Scheduler
from braid.engine.messages import EngineCoreOutputs, EngineCoreRequest
from braid.errors import EngineDeadError
from braid.executor.worker_setup import WorkerError
from braid.executor.uniproc import UniprocExecutor
from braid.gc_heap import freeze_startup_heap
from braid.observe.trace import make_tracer

logger = logging.getLogger(__name__)

# Interleaved multi-step (pipeline parallelism): passes of one batch launched and not yet reported.
PASSES_AHEAD = 2


@dataclass
class LaunchedBatch:
    scheduler_output: object
    pending: deque = field(default_factory=deque)  # launched passes' outputs, not yet reported
    to_launch: int = 0                             # interleaved multi-step: passes not yet launched
    last_launch: int = 0                           # the engine's launch count at its latest pass


def next_further_pass(in_flight, num_launches: int, shares: int) -> "LaunchedBatch | None":
    """Interleaved multi-step: the batch to launch a further pass of now, or None. Round-robin:
    the batch that launched least recently first. A batch with a pass still unreported launches
    another only if every other share has launched since (so the stages' queues interleave the
    shares) and it has fewer than PASSES_AHEAD out; otherwise it waits for that pass's report."""
    ready = [b for b in in_flight if b.to_launch and len(b.pending) < PASSES_AHEAD
             and (not b.pending or num_launches - b.last_launch >= shares)]
    return min(ready, key=lambda b: b.last_launch, default=None)


def check_kv_holds_max_len(num_blocks: int, config: EngineConfig) -> None:
    """A pool (per replica) that cannot hold one --max-model-len request would leave such a
    request waiting forever: refuse to start instead."""
    max_len = config.scheduler.max_model_len
    if num_blocks * config.cache.block_size < max_len:
        raise ValueError(
            f"the KV cache holds {num_blocks * config.cache.block_size} tokens, fewer than --max-model-len "
            f"({max_len}); lower --max-model-len or give the cache more memory "
            f"(--gpu-memory-utilization / --kv-cache-memory)"
        )


def ends_on_worker_failure(step):
    """A core's step: a worker failure ends the engine; every later step raises
    EngineDeadError with the cause. Stopping the surviving workers is the owner's part (an
    engine-core process reports the error first, then kills them; LLMEngine at once)."""

    @functools.wraps(step)
    def guarded(core):
        if core.dead_reason is not None:
            raise EngineDeadError(core.dead_reason)
        try:
            return step(core)
        except WorkerError as e:
            core.dead_reason = f"the engine stopped after a worker failure: {e}"
            raise

    return guarded


class EngineCore:
    dead_reason: str | None = None  # set once a worker has failed

    def __init__(self, config: EngineConfig) -> None:
        freeze_startup_heap()
        self.config = config
        self.tracer = make_tracer(config.trace_dir, "engine-core")
        backend = config.parallel.distributed_executor_backend
        if backend == "mp":
            from braid.executor.multiproc import MultiprocExecutor

            self.executor = MultiprocExecutor(config, self.tracer)
        elif backend == "ray":
            from braid.executor.ray import RayExecutor

            self.executor = RayExecutor(config, self.tracer)
        else:
            self.executor = UniprocExecutor(config, self.tracer)
        try:
            self._init_cache_and_scheduler(config)
        except BaseException:
            self.executor.shutdown()  # no worker outlives a failed start
            raise

    def _init_cache_and_scheduler(self, config: EngineConfig) -> None:
        num_blocks = self.executor.determine_num_blocks()
        check_kv_holds_max_len(num_blocks, config)
        self.executor.initialize_kv_cache(num_blocks)
        self.kv_cache_manager = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager)
        # Each pipeline stage holds a batch; async scheduling keeps one more in flight.
        self.max_batches_in_flight = config.scheduler.batches_in_flight
        self.stream_outputs = config.scheduler.multi_step_stream_outputs
        self.interleaves_passes = config.scheduler.interleaves_passes
        # Batches launched and not yet fully reported, oldest first; and one entry per launched
        # pass, in launch order (the order their outputs come back in).
        self.in_flight: deque[LaunchedBatch] = deque()
        self.report_order: deque[LaunchedBatch] = deque()
        self._next_batch_id = 0
        self._num_launches = 0

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_manager.num_blocks

    def add_request(self, request: EngineCoreRequest, received_ts: float | None = None) -> None:
        self.scheduler.add_request(Request(request, self.config.cache.block_size, received_ts))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        """Requests to run, or batches still to report."""
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    @ends_on_worker_failure
    def step(self) -> EngineCoreOutputs:
        """Report the next forward pass's tokens (or nothing, when async scheduling has
        only just launched its first batch)."""
        tracer = self.tracer
        with tracer.cpu_span("step"):
            # Penalties read every generated id on the host: with one of those requests
            # around, report the batch in flight before scheduling the next (a synchronous step).
            must_drain = self.in_flight and self.scheduler.num_needing_output_history
            if (len(self.in_flight) < self.max_batches_in_flight and self.scheduler.has_unfinished_requests()
                    and not must_drain):
                with tracer.cpu_span("schedule"):
                    scheduler_output = self.scheduler.schedule()
                if scheduler_output.is_empty and self.in_flight:
                    # Nothing new can run (every request is in flight): occupy no slot; the
                    # finished/preempted ids it carries go to the workers with the next batch.
                    self.scheduler.defer(scheduler_output)
                else:
                    self._launch(scheduler_output)
                    if len(self.in_flight) < self.max_batches_in_flight:
                        return EngineCoreOutputs(outputs=[], stats=self.scheduler.make_stats())
            if self.interleaves_passes:
                self._launch_further_passes()
            if not self.report_order:
                return EngineCoreOutputs(outputs=[], stats=self.scheduler.make_stats())
            if self.stream_outputs or self.interleaves_passes:
                return self._report_next_pass()
            # Without streaming, a multi-step batch reports all its passes at once.
            batch = self.report_order[0]
            parts = []
            while self.report_order and self.report_order[0] is batch:
                parts.append(self._report_next_pass())
            return EngineCoreOutputs.combine(parts, parts[-1].stats)

    def _launch(self, scheduler_output) -> None:
        scheduler_output.batch_id = self._next_batch_id
        self._next_batch_id += 1
        batch = LaunchedBatch(scheduler_output, last_launch=self._num_launches)
        self._num_launches += 1
        batch.pending.extend(self.executor.execute_model_async(scheduler_output))
        # Interleaved multi-step: only the first pass is launched now.
        batch.to_launch = scheduler_output.num_steps - len(batch.pending)
        self.in_flight.append(batch)
        self.report_order.extend([batch] * len(batch.pending))

    def _launch_further_passes(self) -> None:
        """Interleaved multi-step: launch further passes while `next_further_pass` names one."""
        shares = self.config.scheduler.num_micro_batches
        while (batch := next_further_pass(self.in_flight, self._num_launches, shares)) is not None:
            (pending,) = self.executor.continue_model_async(batch.scheduler_output.batch_id)
            batch.pending.append(pending)
            batch.to_launch -= 1
            batch.last_launch = self._num_launches
            self._num_launches += 1
            self.report_order.append(batch)

    def _report_next_pass(self) -> EngineCoreOutputs:
        batch = self.report_order[0]
        # Taken off the queues only once its reply is in: a wait cut short (Ctrl-C in
        # LLM.generate) leaves the pass queued, to be waited for again (a reply keeps its result).
        with self.tracer.cpu_span("wait_output"):
            runner_output = batch.pending[0].result()
        self.report_order.popleft()
        batch.pending.popleft()
        if not batch.pending and not batch.to_launch:
            self.in_flight.remove(batch)
        with self.tracer.cpu_span("process_outputs"):
            return self.scheduler.update_from_output(batch.scheduler_output, runner_output)

    def kill_workers(self) -> None:
        """Kill worker processes at once (no-op in process): for a core that is going down hard."""
        kill = getattr(self.executor, "kill_workers", None)
        if kill is not None:
            kill()

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def make_stats(self):
        return self.scheduler.make_stats()

    def shutdown(self) -> None:
        self.executor.shutdown()
        self.tracer.close()


def make_engine_core(config: EngineConfig):
    """One engine core, or one per data-parallel replica driven together."""
    if config.parallel.data_parallel_size > 1:
        from braid.engine.dp_core import DPEngineCore

        return DPEngineCore(config)
    return EngineCore(config)
