"""--trace-dir: the engine writes its step timeline, and `braid trace summarize` reads it."""
import json
import os

from braid import LLM, SamplingParams
from braid.entrypoints.cli import main as cli_main
from tests.tiny_checkpoints import make_tiny_checkpoint


def test_engine_writes_a_summarizable_timeline(tmp_path, capsys):
    model = make_tiny_checkpoint("llama", tmp_path / "m")
    trace_dir = tmp_path / "trace"
    llm = LLM(str(model), max_model_len=128, kv_cache_memory="8MiB", trace_dir=str(trace_dir))
    llm.generate(["Hello world", "The capital of France is"], SamplingParams(max_tokens=5, ignore_eos=True),
                 use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()  # flushes the trace
    files = [f for f in os.listdir(trace_dir) if f.startswith("braid-trace-engine-core")]
    assert len(files) == 1
    events = json.load(open(trace_dir / files[0]))["traceEvents"]
    names = {e["name"] for e in events if e.get("ph") == "X"}
    assert {"step", "schedule", "prepare_inputs", "launch", "sample", "process_outputs"} <= names
    assert sum(1 for e in events if e.get("name") == "step") >= 5

    out_json = tmp_path / "summary.json"
    assert cli_main(["trace", "summarize", str(trace_dir), "--json", str(out_json)]) == 0
    summary = json.load(open(out_json))
    assert summary["steps"]["count"] >= 5
    assert "step" in capsys.readouterr().out.lower()
