"""One worker per device rank: sets the device up, owns the model runner,
and sizes the KV cache from the memory left after the model."""
from __future__ import annotations

import logging

import torch

from braid.config import EngineConfig
from braid.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from braid.worker.async_output import AsyncModelRunnerOutput
from braid.worker.cuda_graphs import estimate_graph_memory
from braid.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 2 * 2**30


class Worker:
    def __init__(self, config: EngineConfig, tracer=None) -> None:
        self.config = config
        device = config.device.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.manual_seed(config.model.seed)
        self.model_runner = ModelRunner(config, tracer)

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = self.model_runner.kv_bytes_per_block()
        device = self.config.device.device
        if device.type != "cuda":
            budget = cache.kv_cache_memory or CPU_DEFAULT_KV_CACHE_BYTES
        elif cache.kv_cache_memory is not None:
            budget = cache.kv_cache_memory
        else:
            peak_activations = self.model_runner.profile_peak_memory()
            sched = self.config.scheduler
            graphs = (estimate_graph_memory(peak_activations, sched.max_num_seqs, sched.max_num_batched_tokens)
                      if self.model_runner.use_cuda_graphs else 0)
            free, total = torch.cuda.mem_get_info(device)
            budget = int(total * cache.gpu_memory_utilization) - (total - free) - peak_activations - graphs
            logger.info("GPU memory: total %.1f GiB, in use %.1f GiB, activation peak %.2f GiB, CUDA graphs "
                        "%.2f GiB -> KV %.1f GiB", total / 2**30, (total - free) / 2**30, peak_activations / 2**30,
                        graphs / 2**30, budget / 2**30)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(
                f"no memory left for the KV cache ({budget / 2**30:.2f} GiB); raise --gpu-memory-utilization "
                f"or --kv-cache-memory, or use a smaller model"
            )
        return int(num_blocks)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> list[AsyncModelRunnerOutput]:
        return self.model_runner.execute_model_async(scheduler_output)

    def continue_model_async(self, batch_id: int) -> list[AsyncModelRunnerOutput]:
        return self.model_runner.continue_model_async(batch_id)
