"""The frontend's handle on the engine-core process: starts it, talks to it over
ZMQ ipc sockets in a private directory, and notices when it dies."""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile

import zmq
import zmq.asyncio

from braid.engine import serialization as ser
from braid.errors import EngineStartupError

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600


class EngineCoreClient:
    def __init__(self, engine_args) -> None:
        # A directory only this user can enter keeps other users off the sockets.
        self.ipc_dir = tempfile.mkdtemp(prefix="braid-ipc-")
        os.chmod(self.ipc_dir, 0o700)
        self.input_addr = f"ipc://{self.ipc_dir}/input"
        self.output_addr = f"ipc://{self.ipc_dir}/output"
        self.ctx = zmq.asyncio.Context()
        self.input_socket = self.ctx.socket(zmq.PUSH)
        self.input_socket.bind(self.input_addr)
        self.output_socket = self.ctx.socket(zmq.PULL)
        self.output_socket.bind(self.output_addr)

        from braid.engine.core_proc import run_engine_core

        mp = multiprocessing.get_context("spawn")
        ready_recv, ready_send = mp.Pipe(duplex=False)
        # Not daemonic: a daemonic process may not start children, and the core starts one
        # worker process per rank for multi-GPU runs. It still never outlives us: shutdown()
        # stops it, and it exits by itself when it sees its parent gone.
        self.process = mp.Process(target=run_engine_core, name="braid-engine-core", daemon=False,
                                  args=(engine_args, self.input_addr, self.output_addr, ready_send, os.getpid()))
        self.process.start()
        ready_send.close()
        try:
            self.ready = self._wait_ready(ready_recv)
        except BaseException:
            self.shutdown()
            raise
        finally:
            ready_recv.close()

    def _wait_ready(self, pipe) -> ser.ReadyInfo:
        if not pipe.poll(STARTUP_TIMEOUT_S):
            raise EngineStartupError(f"the engine core did not start within {STARTUP_TIMEOUT_S} s")
        try:
            data = pipe.recv_bytes()
        except EOFError:
            raise EngineStartupError(f"the engine core exited during startup (exit code {self.process.exitcode})")
        kind, _, body = data.partition(b"\0")
        _, payload = ser.decode([kind, body])
        if kind == ser.ERROR:
            # Bad user input (a missing model, a bad flag) keeps its type so callers can answer clearly.
            if payload.startswith("ValueError: "):
                raise ValueError(payload[len("ValueError: "):])
            raise EngineStartupError(payload)
        return payload

    @property
    def is_alive(self) -> bool:
        return self.process.is_alive()

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    async def send(self, kind: bytes, body=None) -> None:
        await self.input_socket.send_multipart(ser.encode(kind, body), copy=False)

    async def recv(self):
        return ser.decode(await self.output_socket.recv_multipart())

    def shutdown(self, timeout: float = 5.0) -> None:
        if self.process.is_alive():
            self.process.terminate()  # the core exits its loop on SIGTERM
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
