"""`braid bench throughput` in-process on a tiny checkpoint."""
from __future__ import annotations

import argparse
import json

import pytest

from braid.bench.cli import add_bench_subparsers
from tests.tiny_checkpoints import make_tiny_checkpoint


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="braid")
    add_bench_subparsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", "throughput", *argv])


def test_throughput_json(tmp_path, capsys):
    model = make_tiny_checkpoint("llama", tmp_path / "ckpt")
    out = tmp_path / "tp.json"
    args = _parse(["--model", str(model), "--device", "cpu", "--num-prompts", "5", "--input-len", "12",
                   "--output-len", "7", "--kv-cache-memory", "64MiB", "--max-num-seqs", "4", "--disable-tqdm",
                   "--result-json", str(out)])
    assert args.func(args) == 0
    assert "Throughput:" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["benchmark"] == "throughput"
    assert "git_commit" in result["run_info"] and "torch" in result["run_info"]
    host = result["run_info"]["host"]  # host speed: W1 moves with it on the same GPU
    assert host["cpus"] >= 1 and host["python_workload_ms"] > 0 and host["cpu"]
    cfg = result["config"]
    assert (cfg["num_prompts"], cfg["input_len"], cfg["output_len"]) == (5, 12, 7)
    assert cfg["engine_args"]["max_num_seqs"] == 4 and cfg["engine_args"]["model"] == str(model)
    assert cfg["resolved"]["device"] == "cpu"
    with open(f"{model}/config.json") as f:  # the model's shape, not only its (maybe temporary) path
        shape = json.load(f)
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert cfg["model_config"][key] == shape[key], key
    s = result["summary"]
    assert s["num_requests"] == 5
    assert s["total_prompt_tokens"] == 5 * 12
    assert result["output_lens"] == [7] * 5  # ignore_eos: every request runs to max_tokens
    assert s["total_output_tokens"] == 35
    assert s["elapsed_s"] > 0
    assert s["requests_per_s"] == pytest.approx(5 / s["elapsed_s"])
    assert s["output_tokens_per_s"] == pytest.approx(35 / s["elapsed_s"])
    assert s["total_tokens_per_s"] == pytest.approx(95 / s["elapsed_s"])


def test_throughput_rejects_too_long(tmp_path, capsys):
    model = make_tiny_checkpoint("llama", tmp_path / "ckpt")
    args = _parse(["--model", str(model), "--device", "cpu", "--num-prompts", "2", "--input-len", "60",
                   "--output-len", "10", "--max-model-len", "64", "--kv-cache-memory", "64MiB"])
    assert args.func(args) == 2
    assert "--max-model-len" in capsys.readouterr().err
