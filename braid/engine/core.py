"""EngineCore: owns the scheduler and the executor; one step() schedules,
runs the model and turns the result into per-request outputs."""
from __future__ import annotations

import logging

from braid.config import EngineConfig
from braid.core.kv_cache_manager import KVCacheManager
from braid.core.request import Request
from braid.core.scheduler import Scheduler
from braid.engine.messages import EngineCoreOutputs, EngineCoreRequest
from braid.executor.uniproc import UniprocExecutor
from braid.observe.trace import make_tracer

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
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

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_manager.num_blocks

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request(request, self.config.cache.block_size))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        tracer = self.tracer
        with tracer.cpu_span("step"):
            with tracer.cpu_span("schedule"):
                scheduler_output = self.scheduler.schedule()
            runner_output = self.executor.execute_model(scheduler_output)
            with tracer.cpu_span("process_outputs"):
                return self.scheduler.update_from_output(scheduler_output, runner_output)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()
        self.tracer.close()
