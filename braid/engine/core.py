"""EngineCore: owns the scheduler and the executor; one step() schedules,
runs the model and turns the result into per-request outputs.

With async scheduling, step() keeps up to two batches in flight: it schedules
and launches batch t+1 before it waits for batch t's tokens, so the host's
scheduling, input preparation and output processing overlap the device's work.
Each call still reports at most one batch, in order.
"""
from __future__ import annotations

import atexit
import gc
import logging
from collections import deque

from braid.config import EngineConfig
from braid.core.kv_cache_manager import KVCacheManager
from braid.core.request import Request
from braid.core.scheduler import Scheduler
from braid.engine.messages import EngineCoreOutputs, EngineCoreRequest
from braid.executor.uniproc import UniprocExecutor
from braid.observe.trace import make_tracer

logger = logging.getLogger(__name__)

_import_heap_frozen = False


def _freeze_import_heap() -> None:
    """Exempt what exists at the first engine's start (torch, transformers: ~1M objects)
    from the cyclic garbage collector. A full collection over them stalled W1's steps for
    ~300 ms each time. Once per process, before the model is built, so later engines'
    objects stay collectable."""
    global _import_heap_frozen
    if not _import_heap_frozen:
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)  # let the exit-time collection see everything again
        _import_heap_frozen = True


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        _freeze_import_heap()
        self.config = config
        self.tracer = make_tracer(config.trace_dir, "engine-core")
        self.executor = UniprocExecutor(config, self.tracer)
        num_blocks = self.executor.determine_num_blocks()
        max_len = config.scheduler.max_model_len
        if num_blocks * config.cache.block_size < max_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.cache.block_size} tokens, fewer than --max-model-len "
                f"({max_len}); lower --max-model-len or give the cache more memory "
                f"(--gpu-memory-utilization / --kv-cache-memory)"
            )
        self.executor.initialize_kv_cache(num_blocks)
        self.kv_cache_manager = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager)
        self.async_scheduling = config.scheduler.async_scheduling
        # Launched batches not yet reported: (scheduler output, pending runner output).
        self.in_flight: deque = deque()

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_manager.num_blocks

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request(request, self.config.cache.block_size))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        """Requests to run, or batches still to report."""
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    def step(self) -> EngineCoreOutputs:
        if self.async_scheduling:
            return self._step_async()
        tracer = self.tracer
        with tracer.cpu_span("step"):
            with tracer.cpu_span("schedule"):
                scheduler_output = self.scheduler.schedule()
            runner_output = self.executor.execute_model(scheduler_output)
            with tracer.cpu_span("process_outputs"):
                return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _step_async(self) -> EngineCoreOutputs:
        tracer = self.tracer
        with tracer.cpu_span("step"):
            # Penalties read every generated id on the host: with one of those requests
            # around, report the batch in flight before scheduling the next (a synchronous step).
            must_drain = self.in_flight and self.scheduler.num_needing_output_history
            if len(self.in_flight) < 2 and self.scheduler.has_unfinished_requests() and not must_drain:
                with tracer.cpu_span("schedule"):
                    scheduler_output = self.scheduler.schedule()
                self.in_flight.append((scheduler_output, self.executor.execute_model_async(scheduler_output)))
                if len(self.in_flight) < 2:
                    return EngineCoreOutputs(outputs=[], stats=self.scheduler.make_stats())
            if not self.in_flight:
                return EngineCoreOutputs(outputs=[], stats=self.scheduler.make_stats())
            scheduler_output, pending = self.in_flight.popleft()
            with tracer.cpu_span("wait_output"):
                runner_output = pending.result()
            with tracer.cpu_span("process_outputs"):
                return self.scheduler.update_from_output(scheduler_output, runner_output)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()
        self.tracer.close()
