"""The multiprocess executor: one worker process per rank (--distributed-executor-backend mp).

The engine core broadcasts every call to all ranks through a shared-memory ring
(executor/shm_queue.py; a call too large for a slot goes over each worker's pipe),
as msgspec frames (never pickled). Every rank runs every model step (the collectives
need them all); only the output rank (the last pipeline stage's first TP rank)
replies with the step's tokens, one reply per pass.
Setup calls (KV sizing, cache allocation) are answered by every rank. While it
waits, the executor also watches every worker's process sentinel: a worker that
dies or raises ends the engine with an error naming the rank at once, never a hang.

Workers start with `spawn` and rendezvous through a file in a private temporary
directory; gloo on CPU, NCCL on GPU (rank r uses cuda:r).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import shutil
import threading
import time
import traceback

from braid.config import EngineConfig
from braid.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from braid.executor.rendezvous_dir import RendezvousDir
from braid.executor.shm_queue import BroadcastReader, BroadcastWriter
from braid.executor.worker_setup import (
    WorkerError, destroy_process_group, launched_passes, report_passes, start_worker)
from braid.observe.process_logging import configure_process_logging

__all__ = ["MultiprocExecutor", "WorkerError"]

logger = logging.getLogger(__name__)

_POLL_S = 0.5


def _codec():
    import msgspec

    enc = msgspec.msgpack.Encoder()
    decoders = {
        "execute_model": msgspec.msgpack.Decoder(SchedulerOutput),
        "execute_model_dp": msgspec.msgpack.Decoder(list[SchedulerOutput]),
        "determine_num_blocks": msgspec.msgpack.Decoder(None),
        "initialize_kv_cache": msgspec.msgpack.Decoder(int),
        "continue_model": msgspec.msgpack.Decoder(int),
        "shutdown": msgspec.msgpack.Decoder(None),
    }
    return enc, decoders, msgspec


def _frame(method: str, body: bytes) -> bytes:
    return method.encode() + b"\0" + body


def _split(frame: bytes) -> tuple[str, bytes]:
    head, _, body = frame.partition(b"\0")
    return head.decode(), body


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, tracer=None) -> None:
        self.config = config
        self.world_size = config.parallel.world_size
        self.output_rank = config.parallel.output_rank
        self._enc, _, self._msgspec = _codec()
        self._reply_decoder = self._msgspec.msgpack.Decoder(ModelRunnerOutput)
        self._rendezvous = RendezvousDir()  # private to this user (0700)
        init_method = "file://" + os.path.join(self._rendezvous.path, "rendezvous")
        ring_path = os.path.join(self._rendezvous.path, "broadcast")
        self.procs, self.conns = [], []
        try:
            self._writer = BroadcastWriter(ring_path, self.world_size, send_fallback=self._send_frame,
                                           check_readers=self.check_alive)
            # GPU hosts have a core per rank to spare: spin for new calls (the wake-up is what a
            # step waits on); CPU ranks need every core for the model, so they sleep at once.
            spin_s = 0.5 if config.device.device.type == "cuda" else 0.0
            ctx = mp.get_context("spawn")
            for rank in range(self.world_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(rank, config, init_method, child, ring_path, spin_s),
                                   daemon=True, name=f"braid-worker-{rank}")
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
            for rank in range(self.world_size):
                self._recv(rank)  # "ready": the model is loaded on every rank
        except BaseException:  # a rank that failed or died: the others go too, and the ring with them
            self.kill_workers()
            self._release()
            raise
        self._closed = False

    # ---- plumbing ---------------------------------------------------------------
    def _broadcast(self, method: str, body=None) -> None:
        self._writer.enqueue(_frame(method, self._enc.encode(body)))

    def _send_frame(self, rank: int, frame: bytes) -> None:
        try:
            self.conns[rank].send_bytes(frame)
        except (BrokenPipeError, OSError):
            self._raise_dead(rank)

    def check_alive(self) -> None:
        """Raise WorkerError if a worker has died (an idle engine core calls it: no step would notice)."""
        for rank, proc in enumerate(self.procs):
            if not proc.is_alive():
                self._raise_dead(rank)

    def _recv(self, rank: int) -> bytes:
        """Rank's next reply; raises WorkerError if any worker dies or fails meanwhile."""
        conn = self.conns[rank]
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        while True:
            ready = mp.connection.wait([conn, *sentinels], timeout=_POLL_S)
            if conn in ready:
                try:
                    kind, body = _split(conn.recv_bytes())
                except (EOFError, OSError):
                    self._raise_dead(rank)
                if kind == "error":
                    raise WorkerError(f"worker rank {rank} failed: {body.decode(errors='replace')}")
                return body
            for s in ready:
                if s in sentinels:
                    self._raise_dead(sentinels[s])

    def _raise_dead(self, rank: int):
        proc = self.procs[rank]
        proc.join(timeout=1.0)
        raise WorkerError(f"worker rank {rank} (pid {proc.pid}) died (exit code {proc.exitcode}); "
                          f"the engine cannot continue")

    # ---- the executor interface ---------------------------------------------------
    def determine_num_blocks(self) -> int:
        self._broadcast("determine_num_blocks")
        # Every rank holds the same number of blocks: the smallest any rank can afford.
        return min(self._msgspec.msgpack.decode(self._recv(r), type=int) for r in range(self.world_size))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._broadcast("initialize_kv_cache", num_blocks)
        for rank in range(self.world_size):
            self._recv(rank)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> list["PendingReply"]:
        self._broadcast("execute_model", scheduler_output)
        return [PendingReply(self, self.output_rank) for _ in range(launched_passes(self.config, scheduler_output))]

    def continue_model_async(self, batch_id: int) -> list["PendingReply"]:
        """The next pass of an interleaved multi-step batch (pipeline parallelism)."""
        self._broadcast("continue_model", batch_id)
        return [PendingReply(self, self.output_rank)]

    def execute_model_dp(self, scheduler_outputs: list[SchedulerOutput]) -> list[list["PendingReply"]]:
        """Data parallelism: replica d runs scheduler_outputs[d] (a dummy batch when it is
        empty); per replica, one pending reply per pass."""
        self._broadcast("execute_model_dp", scheduler_outputs)
        return [[PendingReply(self, rank) for _ in range(so.num_steps)]
                for rank, so in zip(self.config.parallel.output_ranks, scheduler_outputs)]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        (reply,) = self.execute_model_async(scheduler_output)
        return reply.result()

    def next_output(self, rank: int) -> ModelRunnerOutput:
        return self._reply_decoder.decode(self._recv(rank))

    def kill_workers(self) -> None:
        """Going down hard: kill the workers and unlink the ring's directory (its mapping stays
        valid for anyone still holding it). No waiting: a process that exits next reaps them."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        self._rendezvous.remove()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the workers to stop (each closes its tracer), wait up to `timeout`, kill the rest."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._broadcast("shutdown")
        except (WorkerError, OSError):
            pass
        _join_all(self.procs, timeout=timeout)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        self._release()

    def _release(self) -> None:
        """Reap the (exited or killed) workers; close the pipes, the ring and its directory."""
        _join_all(self.procs, timeout=3.0)
        for conn in self.conns:
            conn.close()
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.close()
        self._rendezvous.remove()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _join_all(procs, timeout: float) -> None:
    """Join every process against one deadline (not `timeout` each: at TP=8 that adds up)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))


class PendingReply:
    """One pass's tokens from an output rank. Replies arrive in launch order; the engine core
    reads them in that order, so each result() takes the next one off that rank's pipe."""

    def __init__(self, executor: MultiprocExecutor, rank: int) -> None:
        self._executor = executor
        self._rank = rank
        self._result: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self._executor.next_output(self._rank)
        return self._result


def _worker_main(rank: int, config: EngineConfig, init_method: str, conn, ring_path: str, spin_s: float) -> None:
    configure_process_logging(f"braid-worker-{rank}")
    parent_pid = os.getppid()
    enc, decoders, _ = _codec()

    def deliver(out) -> None:
        conn.send_bytes(_frame("ok", enc.encode(out)))

    def on_error(tb: str) -> None:
        try:
            conn.send_bytes(_frame("error", tb.encode()))
        finally:
            os._exit(1)

    try:
        calls = BroadcastReader(ring_path, rank, config.parallel.world_size, recv_fallback=conn.recv_bytes,
                                spin_s=spin_s)
        worker, tracer = start_worker(rank, config, init_method, cuda_index=rank)
        conn.send_bytes(_frame("ok", b""))
        # Launches happen here; a second thread waits for each pass's tokens and replies.
        passes: queue.Queue = queue.Queue()
        threading.Thread(target=report_passes, daemon=True, name="braid-worker-replies",
                         args=(passes, deliver if rank in config.parallel.output_ranks else None, on_error)).start()
        replica = config.parallel.world_size // config.parallel.data_parallel_size
        while True:
            method, body = _split(calls.dequeue())
            payload = decoders[method].decode(body)
            if method == "shutdown":
                tracer.close()
                break
            if method == "execute_model_dp":  # this replica's part of a data-parallel step
                method, payload = "execute_model", payload[rank // replica]
            if method in ("execute_model", "continue_model"):
                launch = worker.execute_model_async if method == "execute_model" else worker.continue_model_async
                for pending in launch(payload):
                    passes.put(pending)
            elif method == "determine_num_blocks":
                conn.send_bytes(_frame("ok", enc.encode(worker.determine_num_blocks())))
            elif method == "initialize_kv_cache":
                worker.initialize_kv_cache(payload)
                conn.send_bytes(_frame("ok", b""))
    except Exception:  # noqa: BLE001 - report to the engine core, then exit
        try:
            conn.send_bytes(_frame("error", traceback.format_exc().encode()))
        except OSError:
            pass
        raise SystemExit(1)
    finally:
        if rank == 0 and os.getppid() != parent_pid:  # the engine was killed: nobody else removes the ring
            shutil.rmtree(os.path.dirname(ring_path), ignore_errors=True)
        destroy_process_group()  # may block on NCCL when the peers are gone: after the cleanup
