"""The KV cache exhausted through the server: 12 concurrent long requests on a 12-block pool
(one request alone needs up to 8). Requests are preempted and recomputed, every one
completes with its full length, /metrics counts the preemptions, and the pool is free after."""
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_checkpoints import make_tiny_checkpoint


def test_exhausted_kv_cache_preempts_and_every_request_completes(tmp_path):
    model = make_tiny_checkpoint("llama", tmp_path / "tiny")
    srv = RemoteServer(model, "--max-model-len", "128", "--device", "cpu", "--num-gpu-blocks-override", "12",
                       "--block-size", "16", "--no-enable-prefix-caching")
    try:
        def complete(i):
            prompt = [3 + (i * 7 + j) % 300 for j in range(60)]  # token ids, distinct per request
            body = {"prompt": prompt, "max_tokens": 60, "ignore_eos": True, "temperature": 0}
            return httpx.post(srv.url + "/v1/completions", json=body, timeout=120)

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(complete, range(12)))
        for r in responses:
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == 60
        metrics = srv.wait_idle()
        assert metrics["braid:num_preemptions_total"] > 0
        assert metrics["braid:kv_cache_usage_perc"] == 0
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()
