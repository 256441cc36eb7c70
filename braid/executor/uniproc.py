"""The executor for one device: the worker lives in the engine-core process."""
from __future__ import annotations

from braid.config import EngineConfig
from braid.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from braid.worker.async_output import AsyncModelRunnerOutput
from braid.worker.worker import Worker


class UniprocExecutor:
    def __init__(self, config: EngineConfig, tracer=None) -> None:
        self.worker = Worker(config, tracer)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> list[AsyncModelRunnerOutput]:
        """Launch the step's passes; each pending output's .result() waits for that pass's tokens."""
        return self.worker.execute_model_async(scheduler_output)

    def continue_model_async(self, batch_id: int) -> list[AsyncModelRunnerOutput]:
        return self.worker.continue_model_async(batch_id)

    def shutdown(self, timeout: float = 0.0) -> None:
        pass
