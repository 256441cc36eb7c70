"""Data parallelism (--data-parallel-size N): N model replicas, each with its own
scheduler and KV cache (one engine core per DP rank), driven in lockstep.

A mixture-of-experts layer is collective over every DP rank (its all-to-all moves
tokens between replicas), so when any rank has work every rank runs the step: a rank
with nothing scheduled runs a dummy one-token batch that takes part in the collectives
and reports nothing. When no rank has work, nobody steps. New requests go to the rank
with the fewest unfinished requests (the coordinator); a request stays on its rank.

With async scheduling the replicas' next step is scheduled and launched before the
current one's tokens are awaited (two steps in flight), as in EngineCore. With
multi-step scheduling every replica runs the same number of passes per step (each
pass has the MoE collectives): the fewest any busy replica scheduled; the others give
their extra passes back.

All replicas' workers are ranks of one process group (rank = dp_rank * pp * tp + ...),
started by one executor — worker processes on this machine (mp) or Ray actors, which
may sit on several machines (ray); each step sends every worker the list of the N
scheduler outputs and each DP group runs its own.
"""
from __future__ import annotations

import logging
from collections import deque

from braid.config import EngineConfig
from braid.core.kv_cache_manager import KVCacheManager
from braid.core.request import Request
from braid.core.scheduler import Scheduler
from braid.engine.core import check_kv_holds_max_len, ends_on_worker_failure
from braid.engine.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from braid.observe.trace import make_tracer

logger = logging.getLogger(__name__)


class CombinedKVView:
    """The KV pools of every DP rank seen as one (block counts summed)."""

    def __init__(self, managers: list[KVCacheManager]) -> None:
        self.managers = managers

    @property
    def num_blocks(self) -> int:
        return sum(m.num_blocks for m in self.managers)

    @property
    def num_free_blocks(self) -> int:
        return sum(m.num_free_blocks for m in self.managers)

    def reset_prefix_cache(self) -> bool:
        return all([m.reset_prefix_cache() for m in self.managers])


def merge_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    n = len(stats)
    return SchedulerStats(
        num_running=sum(s.num_running for s in stats),
        num_waiting=sum(s.num_waiting for s in stats),
        kv_cache_usage=sum(s.kv_cache_usage for s in stats) / n,
        prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
        num_preemptions=sum(s.num_preemptions for s in stats),
        num_wasted_tokens=sum(s.num_wasted_tokens for s in stats),
    )


class DPEngineCore:
    dead_reason: str | None = None  # set once a worker has failed

    def __init__(self, config: EngineConfig) -> None:
        from braid.gc_heap import freeze_startup_heap

        freeze_startup_heap()
        self.config = config
        self.dp_size = config.parallel.data_parallel_size
        self.tracer = make_tracer(config.trace_dir, "engine-core")
        if config.parallel.distributed_executor_backend == "ray":
            from braid.executor.ray import RayExecutor as executor_cls
        else:
            from braid.executor.multiproc import MultiprocExecutor as executor_cls
        self.executor = executor_cls(config, self.tracer)
        try:
            num_blocks = self.executor.determine_num_blocks()
            check_kv_holds_max_len(num_blocks, config)  # each replica's pool, as without DP
            self.executor.initialize_kv_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.kv_managers = [KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
                            for _ in range(self.dp_size)]
        self.schedulers = [Scheduler(config.scheduler, kv) for kv in self.kv_managers]
        self.rank_of: dict[str, int] = {}  # request id -> its DP rank
        self.num_dummy_steps = 0  # passes a rank ran with nothing scheduled (tests read it)
        self.max_steps_in_flight = config.scheduler.batches_in_flight  # 2 with async scheduling
        self.stream_outputs = config.scheduler.multi_step_stream_outputs
        # Launched lockstep steps not yet fully reported: (scheduler outputs, per replica a
        # deque of its passes' pending replies).
        self.in_flight: deque = deque()
        self.max_in_flight_seen = 0  # tests read it: async scheduling really overlapped steps

    @property
    def num_blocks(self) -> int:
        return self.kv_managers[0].num_blocks

    @property
    def kv_cache_manager(self) -> CombinedKVView:
        return CombinedKVView(self.kv_managers)

    def add_request(self, request: EngineCoreRequest, received_ts: float | None = None) -> None:
        rank = min(range(self.dp_size), key=lambda d: self.schedulers[d].num_unfinished())
        self.rank_of[request.request_id] = rank
        self.schedulers[rank].add_request(Request(request, self.config.cache.block_size, received_ts))

    def abort_requests(self, request_ids: list[str]) -> None:
        by_rank: dict[int, list[str]] = {}
        for req_id in request_ids:
            rank = self.rank_of.pop(req_id, None)
            if rank is not None:
                by_rank.setdefault(rank, []).append(req_id)
        for rank, ids in by_rank.items():
            self.schedulers[rank].abort_requests(ids)

    def has_unfinished_requests(self) -> bool:
        """Requests to run on some replica, or steps still to report."""
        return any(s.has_unfinished_requests() for s in self.schedulers) or bool(self.in_flight)

    def make_stats(self) -> SchedulerStats:
        return merge_stats([s.make_stats() for s in self.schedulers])

    @ends_on_worker_failure
    def step(self) -> EngineCoreOutputs:
        """Report the oldest launched step's next pass from every replica (all its passes when
        multi-step outputs are not streamed; nothing while async scheduling has only just
        launched its first step)."""
        with self.tracer.cpu_span("step"):
            # Penalties read every generated id on the host: report before scheduling more.
            must_drain = self.in_flight and any(s.num_needing_output_history for s in self.schedulers)
            if (len(self.in_flight) < self.max_steps_in_flight and not must_drain
                    and any(s.has_unfinished_requests() for s in self.schedulers)):
                if self._schedule_and_launch() and len(self.in_flight) < self.max_steps_in_flight:
                    return EngineCoreOutputs(outputs=[], stats=self.make_stats())
            if not self.in_flight:
                return EngineCoreOutputs(outputs=[], stats=self.make_stats())
            if self.stream_outputs:
                return self._report_next_pass()
            # Without streaming, a multi-step step reports all its passes at once.
            step, parts = self.in_flight[0], []
            while self.in_flight and self.in_flight[0] is step:
                parts.append(self._report_next_pass())
            return EngineCoreOutputs.combine(parts, parts[-1].stats)

    def _schedule_and_launch(self) -> bool:
        """Schedule every replica and launch the step; False when no replica had anything to run."""
        with self.tracer.cpu_span("schedule"):
            outputs = [s.schedule() for s in self.schedulers]
        if all(o.is_empty for o in outputs):
            for s, o in zip(self.schedulers, outputs):
                s.defer(o)  # nothing to run anywhere; the ids go with the next batch
            return False
        passes = min(o.num_steps for o in outputs if not o.is_empty)
        for scheduler, o in zip(self.schedulers, outputs):
            if o.is_empty:
                o.num_steps = passes  # an idle replica joins every pass's collectives
            elif o.num_steps > passes:
                scheduler.shrink_steps(o, passes)
        self.num_dummy_steps += sum(o.num_steps for o in outputs if o.is_empty)
        pending = self.executor.execute_model_dp(outputs)
        self.in_flight.append((outputs, [deque(per_rank) for per_rank in pending]))
        self.max_in_flight_seen = max(self.max_in_flight_seen, len(self.in_flight))
        return True

    def _report_next_pass(self) -> EngineCoreOutputs:
        outputs, passes = self.in_flight[0]
        # Every replica's reply first, each left in its deque until all are in: a wait cut short
        # (Ctrl-C in LLM.generate) then leaves the step whole, to be waited for again (a reply
        # keeps its result), instead of a replica's deque empty and the next step failing.
        with self.tracer.cpu_span("wait_output"):
            runner_outputs = [per_rank[0].result() for per_rank in passes]
        for per_rank in passes:
            per_rank.popleft()
        if not passes[0]:
            self.in_flight.popleft()
        parts = []
        for scheduler, so, runner_output in zip(self.schedulers, outputs, runner_outputs):
            with self.tracer.cpu_span("process_outputs"):
                parts.append(scheduler.update_from_output(so, runner_output))
        reported = EngineCoreOutputs.combine(parts, self.make_stats())
        for out in reported.outputs:
            if out.finish_reason is not None:
                self.rank_of.pop(out.request_id, None)
        return reported

    def kill_workers(self) -> None:
        self.executor.kill_workers()

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()
        self.tracer.close()
