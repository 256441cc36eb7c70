"""The soak's result JSON records the run's facts (git commit, torch, host), like every
benchmark result; the server and the load are faked, so this runs in a second."""
import json

from braid.bench import soak


class _FakeServer:
    def __init__(self, model, port, extra, device):
        self.cmd = ["braid", "serve", "--port", str(port)]
        self.url = f"http://127.0.0.1:{port}"

    def rss(self) -> int:
        return 100 * 2**20

    def output(self, tail: int = 4000) -> str:
        return ""

    def stop(self) -> dict:
        return {"exit_code": 0, "forced_kill": False, "children_left_behind": []}


def test_soak_result_records_run_info(tmp_path, monkeypatch):
    async def healthy(server, timeout):
        return "m"

    async def load(server, model, plan, concurrency, deadline):
        return [soak.Outcome(200, ok=True, completion_tokens=3) for _ in plan], True

    async def settle(server, timeout):
        idle = {f"braid:{k}": 0.0 for k in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")}
        return idle, 0.0

    monkeypatch.setattr(soak, "Server", _FakeServer)
    monkeypatch.setattr(soak, "_wait_healthy", healthy)
    monkeypatch.setattr(soak, "_load", load)
    monkeypatch.setattr(soak, "_settle", settle)
    out = tmp_path / "soak.json"
    assert soak.main(["--num-requests", "4", "--abort-fraction", "0", "--result-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["stats"]["completed_ok"] == 4 and result["stats"]["completion_tokens"] == 12
    info = result["run_info"]
    assert info["git_commit"] and "torch" in info and info["host"]["cpus"] >= 1
