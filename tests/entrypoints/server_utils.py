"""Run `braid serve` as a user does: a subprocess on a free loopback port, ready when
/health answers 200, stopped with a signal, leaving no child process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

from braid.bench.soak import free_port, parse_metrics  # noqa: F401 - tests import them from here

STARTUP_TIMEOUT_S = 300


def _serve_command() -> list[str]:
    return [sys.executable, "-m", "braid.entrypoints.cli", "serve"]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class RemoteServer:
    def __init__(self, *args: str, api_key: str | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = _serve_command() + list(args) + ["--port", str(self.port)]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.children: list[psutil.Process] = []
        try:
            self._wait_ready()
        except BaseException:
            self.stop(check=False)
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.children = psutil.Process(self.proc.pid).children(recursive=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def engine_core(self) -> psutil.Process:
        return next(p for p in self.children if "resource_tracker" not in " ".join(p.cmdline()))

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and the KV pool is free again."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["braid:kv_cache_usage_perc"] == 0 and m["braid:num_requests_running"] == 0
                    and m["braid:num_requests_waiting"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, check: bool = True) -> None:
        """Signal the server; it must exit with 0 and take every child (the engine core) with it."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if check:
                    raise AssertionError(f"the server ignored signal {sig} for 30 s:\n{self.output()}")
        deadline = time.monotonic() + 10
        alive = [p for p in self.children if _alive(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _alive(p)]
        for p in alive:
            p.kill()
        if check:
            assert not alive, f"processes left behind after the server exited: {alive}"
            assert self.proc.returncode == 0, f"exit code {self.proc.returncode}:\n{self.output()}"
