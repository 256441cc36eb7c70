"""The Ray executor (--distributed-executor-backend ray): one Ray actor per rank, placed
in one placement group, so the ranks can live on several machines of a Ray cluster.

Every step is sent to every actor (each launches its passes in order); only the output
rank's actor is asked for tokens, one call per pass. Under data parallelism every actor
gets the list of the replicas' steps and runs its replica's; each replica's output rank
reports its tokens. Messages are msgspec frames, as with
the multiprocess executor. Each actor also runs a long "watch" call that returns only
if the worker fails; the engine core waits on it beside every reply, so a dead or
failing actor ends the engine with an error naming its rank, never a hang.

Ray is joined where it runs (RAY_ADDRESS, or a cluster this process already joined);
otherwise a local one is started, shared by this process's engines and stopped with the last.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import traceback

from braid.config import EngineConfig
from braid.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from braid.executor.worker_setup import (
    WORKER_ENV, WorkerError, destroy_process_group, launched_passes, report_passes, start_worker)

logger = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ValueError("--distributed-executor-backend ray needs Ray: pip install 'braid[ray]'") from e
    return ray


# The local cluster an executor here started (its GCS address) and how many live executors use
# it: the last one stops it. Stopped with the first, it would take the others' actors with it.
_local_cluster: str | None = None
_local_cluster_users = 0


class _RayWorker:
    """Lives in a Ray actor. Three concurrency groups of one thread each, so a pass's reply
    can be awaited while the next batch launches, and the watch call never blocks either."""

    def __init__(self) -> None:
        import msgspec

        self._msgspec = msgspec
        self._enc = msgspec.msgpack.Encoder()
        self._so_decoder = msgspec.msgpack.Decoder(SchedulerOutput)
        self._dp_decoder = msgspec.msgpack.Decoder(list[SchedulerOutput])
        self._passes: queue.Queue = queue.Queue()
        self._outputs: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._error: str | None = None

    # ---- setup (launch group) ------------------------------------------------------
    def rendezvous_address(self) -> str:
        """A free TCP port on this actor's node: rank 0 hosts the process-group store there."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, rank: int, config: EngineConfig, init_method: str, env: dict[str, str]) -> None:
        os.environ.update(env)  # the driver's WORKER_ENV values, before NCCL reads them
        try:
            # Ray shows each actor only its own GPU (CUDA_VISIBLE_DEVICES): it is cuda:0 here.
            self.worker, self.tracer = start_worker(rank, config, init_method, cuda_index=0)
        except BaseException:
            self._fail(traceback.format_exc())
            raise
        parallel = config.parallel
        self._replica = rank // (parallel.world_size // parallel.data_parallel_size)  # this rank's DP rank
        deliver = self._outputs.put if rank in parallel.output_ranks else None
        threading.Thread(target=report_passes, args=(self._passes, deliver, self._fail), daemon=True,
                         name="braid-worker-replies").start()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    # ---- steps -------------------------------------------------------------------
    def execute_model(self, frame: bytes) -> None:
        self._execute(lambda: self._so_decoder.decode(frame))

    def execute_model_dp(self, frame: bytes) -> None:
        """Data parallelism: the replicas' steps, of which this rank runs its replica's."""
        self._execute(lambda: self._dp_decoder.decode(frame)[self._replica])

    def continue_model(self, batch_id: int) -> None:
        """The next pass of an interleaved multi-step batch (pipeline parallelism)."""
        self._execute(lambda: batch_id, self.worker.continue_model_async)

    def _execute(self, payload, launch=None) -> None:
        try:
            for pending in (launch or self.worker.execute_model_async)(payload()):
                self._passes.put(pending)
        except Exception:  # noqa: BLE001 - the watch call reports it
            self._fail(traceback.format_exc())

    def next_output(self) -> bytes:  # reply group
        out = self._outputs.get()
        return self._enc.encode(out)

    def watch(self) -> str | None:  # watch group
        """Returns the worker's error when it fails, None at shutdown."""
        self._done.wait()
        return self._error

    def _fail(self, tb: str) -> None:
        self._error = tb
        self._done.set()

    def shutdown(self) -> None:
        self._passes.put(None)
        tracer = getattr(self, "tracer", None)
        if tracer is not None:
            tracer.close()
        destroy_process_group()
        self._done.set()


class RayExecutor:
    def __init__(self, config: EngineConfig, tracer=None) -> None:
        ray = self._ray = _import_ray()
        import msgspec

        self.config = config
        self.world_size = config.parallel.world_size
        self.output_rank = config.parallel.output_rank
        self._enc = msgspec.msgpack.Encoder()
        self._reply_decoder = msgspec.msgpack.Decoder(ModelRunnerOutput)
        self._closed = True
        self._owns_ray = False  # counted among the local cluster's users
        global _local_cluster, _local_cluster_users
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
            else:  # a local cluster for this engine; CPU ranks need one logical CPU each
                ray.init(num_cpus=max(self.world_size, os.cpu_count() or 1), include_dashboard=False,
                         configure_logging=False)
                _local_cluster, _local_cluster_users = ray.get_runtime_context().gcs_address, 0
        if _local_cluster is not None and ray.get_runtime_context().gcs_address == _local_cluster:
            _local_cluster_users += 1
            self._owns_ray = True
        self._pg = None
        try:  # from here on a failure gives back what was taken (the cluster's count above too)
            self._place_actors(config)
        except BaseException:
            self._kill_actors()
            self._release()
            raise
        self._closed = False
        self._watches = [a.watch.options(concurrency_group="watch").remote() for a in self.actors]
        # The worker environment goes with start(), not as a runtime_env: an actor with its own
        # runtime_env cannot use the workers Ray has already started, so Ray starts new ones and
        # then reaps the idle ones — slower, and Ray's idle-worker exit rarely aborts
        # ("Fatal Python error: Aborted", a mutex check in Ray's own shutdown).
        env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
        try:
            init_method = self._get(self.actors[0].rendezvous_address.remote(), 0)
            self._get_all([a.start.remote(rank, config, init_method, env) for rank, a in enumerate(self.actors)])
        except BaseException:
            self.shutdown()
            raise

    def _place_actors(self, config: EngineConfig) -> None:
        """A placement group of one bundle per rank, and an actor in each."""
        ray = self._ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        on_gpu = config.device.device.type == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if on_gpu else {"CPU": 1}
        self._pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=60)
        except ray.exceptions.GetTimeoutError:
            raise ValueError(f"Ray could not place {self.world_size} workers of {bundle} each within 60 s; "
                             f"cluster resources: {ray.cluster_resources()}") from None
        actor_cls = ray.remote(concurrency_groups={"reply": 1, "watch": 1})(_RayWorker)
        self.actors = [
            actor_cls.options(
                num_cpus=1, num_gpus=1 if on_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(self.world_size)
        ]

    # ---- plumbing ---------------------------------------------------------------
    def _get(self, ref, rank: int):
        """The result of a call to rank's actor; raises WorkerError as soon as any worker dies or fails."""
        ray = self._ray
        while True:
            ready, _ = ray.wait([ref, *self._watches], num_returns=1, timeout=None, fetch_local=True)
            if ref in ready:
                try:
                    return ray.get(ref)
                except ray.exceptions.RayActorError:
                    self._raise_failed()
                except ray.exceptions.RayTaskError as e:  # the method raised (setup calls: OOM, ...)
                    self._raise_failed(WorkerError(f"worker rank {rank} failed: {e}"))
            self._raise_failed()

    def _get_all(self, refs: list) -> list:
        """The results of one call per actor, in rank order."""
        return [self._get(ref, rank) for rank, ref in enumerate(refs)]

    def _raise_failed(self, error: WorkerError | None = None):
        """Name the worker that went first. A death makes its peers' collectives fail too,
        so give Ray a moment to notice deaths and report a dead rank before a failed one
        (then `error`, the failed call's own, if the watches name none)."""
        ray = self._ray
        ready, _ = ray.wait(self._watches, num_returns=len(self._watches), timeout=2.0)
        failed = None
        for rank, watch in enumerate(self._watches):
            if watch not in ready:
                continue
            try:
                error = ray.get(watch)
            except ray.exceptions.RayActorError as e:
                raise WorkerError(f"worker rank {rank} died ({type(e).__name__}); the engine cannot continue") \
                    from None
            if failed is None and error is not None:
                failed = WorkerError(f"worker rank {rank} failed: {error}")
        raise failed or error or WorkerError("a worker stopped; the engine cannot continue")

    def check_alive(self) -> None:
        """Raise WorkerError if an actor has died or failed (an idle engine core calls it: no
        step would notice)."""
        if self._closed:
            return
        ready, _ = self._ray.wait(self._watches, num_returns=1, timeout=0)
        if ready:
            self._raise_failed()

    # ---- the executor interface ---------------------------------------------------
    def determine_num_blocks(self) -> int:
        # Every rank holds the same number of blocks: the smallest any rank can afford.
        return min(self._get_all([a.determine_num_blocks.remote() for a in self.actors]))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._get_all([a.initialize_kv_cache.remote(num_blocks) for a in self.actors])

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> list["RayPendingReply"]:
        frame = self._enc.encode(scheduler_output)
        for actor in self.actors:
            actor.execute_model.remote(frame)
        output_actor = self.actors[self.output_rank]
        return [RayPendingReply(self, output_actor.next_output.options(concurrency_group="reply").remote(),
                                self.output_rank)
                for _ in range(launched_passes(self.config, scheduler_output))]

    def continue_model_async(self, batch_id: int) -> list["RayPendingReply"]:
        for actor in self.actors:
            actor.continue_model.remote(batch_id)
        output_actor = self.actors[self.output_rank]
        return [RayPendingReply(self, output_actor.next_output.options(concurrency_group="reply").remote(),
                                self.output_rank)]

    def execute_model_dp(self, scheduler_outputs: list[SchedulerOutput]) -> list[list["RayPendingReply"]]:
        """Data parallelism: replica d runs scheduler_outputs[d] (a dummy batch when it is
        empty); per replica, one pending reply per pass, from its output rank."""
        frame = self._enc.encode(scheduler_outputs)
        for actor in self.actors:
            actor.execute_model_dp.remote(frame)
        return [[RayPendingReply(self, self.actors[rank].next_output.options(concurrency_group="reply").remote(),
                                 rank)
                 for _ in range(so.num_steps)]
                for rank, so in zip(self.config.parallel.output_ranks, scheduler_outputs)]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        (reply,) = self.execute_model_async(scheduler_output)
        return reply.result()

    def kill_workers(self) -> None:
        """Going down hard (a served core's stop, a failed engine): kill the actors at once, then
        remove the placement group and stop the local cluster if this engine started it — the
        process exits next (os._exit), and a cluster left to die with it leaves its raylet's
        agents behind for many seconds. A no-op once stopped (the actor handles are void then)."""
        if self._closed:
            return
        self._closed = True
        self._kill_actors()
        self._release()

    def _kill_actors(self) -> None:
        for actor in getattr(self, "actors", []):
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        try:
            ray.wait([a.shutdown.remote() for a in self.actors], num_returns=len(self.actors), timeout=timeout)
        except Exception:  # noqa: BLE001 - dead actors
            pass
        self._kill_actors()
        self._release()

    def _release(self) -> None:
        ray = self._ray
        if self._pg is not None:
            try:
                ray.util.remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
        if self._owns_ray:
            global _local_cluster, _local_cluster_users
            self._owns_ray = False
            _local_cluster_users -= 1
            if _local_cluster_users == 0:
                _local_cluster = None
                ray.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


class RayPendingReply:
    """One pass's tokens from the output rank's actor."""

    def __init__(self, executor: RayExecutor, ref, rank: int) -> None:
        self._executor = executor
        self._ref = ref
        self._rank = rank
        self._result: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self._executor._reply_decoder.decode(self._executor._get(self._ref, self._rank))
        return self._result

