"""CI version of the soak (braid.bench.soak): a tiny checkpoint behind `braid serve` on CPU
under 300 mixed requests at concurrency 64, a tenth of the clients disconnecting; every
check of the soak (no 5xx, valid finish reasons, idle engine and free KV pool afterwards,
bounded RSS growth, clean SIGTERM shutdown) must pass."""
import json

from braid.bench.soak import main
from tests.tiny_checkpoints import make_tiny_checkpoint


def test_soak_short(tmp_path):
    model = make_tiny_checkpoint("llama", tmp_path / "tiny")
    out = tmp_path / "soak.json"
    rc = main(["--model", model, "--num-requests", "300", "--concurrency", "64", "--abort-fraction", "0.1",
               "--seed", "1", "--max-run-time", "75", "--settle-timeout", "15", "--result-json", str(out)])
    result = json.loads(out.read_text())
    failed = {k: c["detail"] for k, c in result["checks"].items() if not c["pass"]}
    assert not failed, (failed, result["problems"][:5])
    assert rc == 0 and result["passed"]
    stats = result["stats"]
    assert stats["completed_ok"] + stats["aborted"] == stats["num_requests"] == 300
    assert stats["aborted"] > 0  # some clients really disconnected
    assert set(result["status_counts"]) <= {"200", "aborted"}
