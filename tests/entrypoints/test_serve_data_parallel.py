"""`braid serve` with two data-parallel replicas and expert parallelism (tiny Qwen3-MoE,
CPU), also with async and multi-step scheduling: concurrent completions through the
official openai client all finish with the single-device greedy text, and the KV pools
of both replicas are free afterwards. Then a rank's worker dies while no request runs:
/health turns 503 naming it, and the server still stops cleanly."""
import concurrent.futures
import signal
import time

import httpx

import pytest

from braid import LLM, SamplingParams
from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_checkpoints import make_tiny_checkpoint

pytestmark = pytest.mark.distributed

PROMPTS = ["hello there", "The capital of France", "once upon a time", "def main():"]


@pytest.mark.parametrize("extra", [[], ["--async-scheduling", "--num-scheduler-steps", "4"]], ids=["plain", "async-ms4"])
def test_serve_dp2_expert_parallel(tmp_path, extra):
    import openai

    model = make_tiny_checkpoint("qwen3_moe", tmp_path / "moe")
    want = [o.outputs[0].text for o in LLM(model, max_model_len=256, kv_cache_memory="64MiB").generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)]
    srv = RemoteServer(model, "--max-model-len", "256", "--device", "cpu", "--kv-cache-memory", "64MiB",
                       "--data-parallel-size", "2", "--enable-expert-parallel", *extra)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")

        def complete(prompt):
            r = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=12,
                                          temperature=0, extra_body={"ignore_eos": True})
            return r.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(complete, PROMPTS)) == want
        metrics = srv.wait_idle()  # both replicas' pools free again
        assert metrics["braid:kv_cache_usage_perc"] == 0
        if not extra:
            _kill_an_idle_worker_and_see_health_name_it(srv)
    finally:
        srv.stop(signal.SIGINT)


def _kill_an_idle_worker_and_see_health_name_it(srv) -> None:
    """/health said 200 until the next request failed, when no step noticed a worker's death."""
    workers = [p for p in srv.engine_core().children() if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2, workers
    workers[1].kill()
    deadline = time.monotonic() + 10
    while httpx.get(srv.url + "/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 503
    assert "worker rank 1" in health.json()["error"]["message"]
