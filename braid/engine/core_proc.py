"""EngineCore in its own process: a busy loop that drains requests from the
frontend, steps the engine while there is work, and pushes outputs back.

Nothing here waits on HTTP work: the frontend lives in another process, and
a reader thread moves incoming messages to a queue so a step is never
delayed by socket I/O.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback

import zmq

from braid.engine import serialization as ser
from braid.engine.messages import EngineCoreOutput, EngineCoreOutputs
from braid.observe.process_logging import configure_process_logging

logger = logging.getLogger(__name__)

# How often an idle core checks that its parent is alive and whether SIGTERM came.
_IDLE_POLL_S = 0.25


class EngineCoreProc:
    UTILITY_METHODS = ("reset_prefix_cache", "num_free_blocks", "num_blocks")

    def __init__(self, core, input_addr: str, output_addr: str) -> None:
        self.core = core
        self.ctx = zmq.Context()
        self.input_socket = self.ctx.socket(zmq.PULL)
        self.input_socket.connect(input_addr)
        self.output_socket = self.ctx.socket(zmq.PUSH)
        self.output_socket.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow frontend
        self.output_socket.connect(output_addr)
        self.inbox: queue.Queue = queue.Queue()
        self._stats_stale = False
        self.stop_requested = False  # set by the SIGTERM handler: a plain flag is all it may touch
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read_input, daemon=True, name="braid-core-input")
        self._reader.start()

    def _check_workers(self) -> None:
        """Raise if a worker process died: an idle core runs no step that would notice, and
        /health would say 200 until the next request failed."""
        check = getattr(self.core.executor, "check_alive", None)  # mp and Ray; none in process
        if check is not None:
            check()

    def _read_input(self) -> None:
        # Polls with a timeout rather than blocking in recv, so close() can stop it: closing a
        # socket under a thread blocked on it aborts the whole process (a zmq assertion).
        while not self._closing.is_set():
            try:
                if not self.input_socket.poll(_IDLE_POLL_S * 1000):
                    continue
                kind, body = ser.decode(self.input_socket.recv_multipart())
                # Stamped here: a request that arrives during a step waits for it to end, and
                # that wait belongs to its queue time.
                self.inbox.put((kind, body, time.monotonic()))
            except ValueError as e:  # a malformed message is dropped, never executed
                logger.error("dropped a message: %s", e)
            except zmq.ZMQError:
                return

    def close(self) -> None:
        """Stop the reader thread, then close the sockets and the context (for an in-process
        core; the core process leaves through _exit)."""
        self._closing.set()
        self._reader.join()
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)
        self.ctx.term()

    def _handle(self, kind: bytes, body, received_ts: float) -> bool:
        """Apply one message; False means shut down."""
        self._stats_stale = True
        if kind == ser.ADD:
            try:
                self.core.add_request(body, received_ts)
            except ValueError as e:  # e.g. a duplicate id: report it finished so no caller waits on it
                logger.error("rejected request %s: %s", body.request_id, e)
                rejected = EngineCoreOutput(body.request_id, [], finish_reason="abort")
                self._send(ser.OUTPUTS, EngineCoreOutputs([rejected]))
        elif kind == ser.ABORT:
            self.core.abort_requests(body)
        elif kind == ser.UTILITY:
            self._send(ser.UTILITY_RESULT, self._utility(body))
        elif kind == ser.SHUTDOWN:
            return False
        return True

    def _utility(self, call: ser.UtilityCall) -> ser.UtilityResult:
        if call.method not in self.UTILITY_METHODS:
            return ser.UtilityResult(call.call_id, error=f"unknown utility method {call.method!r}")
        if call.method == "reset_prefix_cache":
            return ser.UtilityResult(call.call_id, self.core.reset_prefix_cache())
        kv = self.core.kv_cache_manager
        return ser.UtilityResult(call.call_id, getattr(kv, call.method))

    def _send(self, kind: bytes, body=None) -> None:
        self.output_socket.send_multipart(ser.encode(kind, body), copy=False)

    def run(self, parent_pid: int) -> None:
        """Serve until a SHUTDOWN message, a SIGTERM (stop_requested) or the frontend's death."""
        running = True
        last_parent_check = time.monotonic()
        while running and not self.stop_requested:
            if time.monotonic() - last_parent_check > _IDLE_POLL_S:
                if os.getppid() != parent_pid:  # the frontend is gone: do not linger as an orphan
                    return
                self._check_workers()
                last_parent_check = time.monotonic()
            if not self.core.has_unfinished_requests():
                try:
                    message = self.inbox.get(timeout=_IDLE_POLL_S)
                except queue.Empty:
                    continue
                running = self._handle(*message)
            with self.core.tracer.cpu_span("admit"):  # requests and aborts that came in meanwhile
                while running:
                    try:
                        running = self._handle(*self.inbox.get_nowait())
                    except queue.Empty:
                        break
            if running and self.core.has_unfinished_requests():
                self._send(ser.OUTPUTS, self.core.step())
                self._stats_stale = False
            elif running and self._stats_stale:
                # Idle after an abort (or any message): no step will report the freed blocks.
                self._send(ser.OUTPUTS, EngineCoreOutputs(stats=self.core.make_stats()))
                self._stats_stale = False


def _stop(core, code: int) -> None:
    """Write out what the core's trace still buffers (os._exit skips the tracer's atexit
    flush, and a served --trace-dir run ends here); stop the workers, so none is left in a
    collective (in order when tracing and healthy, so they write theirs too; else killed);
    exit. A SIGTERM from now on exits at once: the client's kill follows in 5 s anyway."""
    signal.signal(signal.SIGTERM, _exit_now)
    try:
        try:
            core.tracer.close()  # first: the core's own timeline, whatever the workers do next
        except Exception:  # noqa: BLE001 - stopping anyway
            logger.exception("could not write the engine core's trace")
        if code == 0 and core.tracer.enabled:
            core.executor.shutdown(timeout=2.0)  # healthy workers write their timelines too; kills the rest
        else:
            core.kill_workers()
    finally:
        _exit(code)


def run_engine_core(engine_args, input_addr: str, output_addr: str, ready_pipe, parent_pid: int) -> None:
    """Entry point of the engine-core process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when to stop
    # SIGTERM: requests die with the process (the frontend reports it), but the trace is
    # written out first: the handler only raises a flag, which the loop checks between steps
    # (an exception raised from a handler can land anywhere, or be swallowed in a gc callback).
    # A core still starting has nothing to keep and exits at once.
    core = None
    proc = None
    serving = False

    def on_sigterm(*_):
        if serving:
            proc.stop_requested = True
            return
        if core is not None:
            core.kill_workers()
        _exit_now()

    signal.signal(signal.SIGTERM, on_sigterm)
    configure_process_logging("braid-core")
    try:
        from braid.engine.core import make_engine_core

        config = engine_args.create_engine_config()
        core = make_engine_core(config)
        signal.signal(signal.SIGTERM, on_sigterm)  # again: ray.init (--distributed-executor-backend ray) replaces it
        proc = EngineCoreProc(core, input_addr, output_addr)
        info = ser.ReadyInfo(core.num_blocks, config.cache.block_size, config.scheduler.max_model_len)
        ready_pipe.send_bytes(b"".join([ser.READY, b"\0", ser.encode(ser.READY, info)[1]]))
    except BaseException as e:  # noqa: BLE001 - every startup failure goes back to the frontend
        message = f"{type(e).__name__}: {e}"
        ready_pipe.send_bytes(ser.ERROR + b"\0" + ser.encode(ser.ERROR, message)[1])
        return
    finally:
        ready_pipe.close()
    serving = True
    try:
        proc.run(parent_pid)
    except BaseException as e:  # noqa: BLE001 - a dead core must say why before it goes
        logger.error("engine core failed:\n%s", traceback.format_exc())
        try:
            proc._send(ser.ERROR, f"{type(e).__name__}: {e}")
        except zmq.ZMQError:
            pass
        _stop(core, 1)  # e.g. the survivors of a dead worker, stuck in a collective
    _stop(core, 0)


def _exit(code: int) -> None:
    """Leave without closing the sockets: the reader thread may be polling one, and closing
    it under that thread, or terminating the context, can abort or hang (close() would wait
    up to a poll interval for the thread instead)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_now(*_) -> None:
    os._exit(0)
