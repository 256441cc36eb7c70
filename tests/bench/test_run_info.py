"""Every benchmark result records the kernel switches it ran with, and never a secret."""
from braid.bench.run_info import run_info


def test_results_record_kernel_switches_but_not_the_api_key(monkeypatch):
    monkeypatch.setenv("BRAID_PDL", "0")
    monkeypatch.setenv("BRAID_API_KEY", "sk-secret")
    monkeypatch.delenv("BRAID_SKINNY_GEMM", raising=False)
    info = run_info()
    assert info["braid_env"] == {"BRAID_PDL": "0"}
    assert "sk-secret" not in repr(info)
