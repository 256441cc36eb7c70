"""A worker process killed mid-step under `braid serve --tensor-parallel-size 2`: the request
in flight gets an error, /health turns 503 within 10 s, and the server still exits cleanly
on SIGINT with no engine core or worker process left behind."""
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_checkpoints import make_tiny_checkpoint

pytestmark = pytest.mark.distributed


def test_killed_worker_fails_requests_and_health(tmp_path):
    model = make_tiny_checkpoint("llama", tmp_path / "tiny")
    srv = RemoteServer(model, "--max-model-len", "256", "--device", "cpu", "--tensor-parallel-size", "2")
    everyone = []
    try:
        core = srv.engine_core()
        workers = [p for p in core.children() if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) == 2, workers
        everyone = [core, *workers]
        result = {}

        def long_request():
            body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True}
            result["response"] = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)

        client = threading.Thread(target=long_request)
        client.start()
        time.sleep(1.0)  # the request is decoding
        workers[1].kill()
        start = time.monotonic()
        client.join(timeout=15)
        assert not client.is_alive(), "the request in flight hung after its worker died"
        response = result["response"]
        assert response.status_code >= 500 and "error" in response.json(), response.text
        while httpx.get(srv.url + "/health").status_code == 200 and time.monotonic() - start < 10:
            time.sleep(0.1)
        assert httpx.get(srv.url + "/health").status_code == 503
        assert time.monotonic() - start < 10
    finally:
        srv.stop(signal.SIGINT)
    deadline = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in everyone) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
