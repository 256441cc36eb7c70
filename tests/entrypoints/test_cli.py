"""The CLI as a user runs it."""
import subprocess
import sys


def _braid(*args, input_text=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "braid.entrypoints.cli", *args], input=input_text,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_answers_paris():
    r = _braid("generate", "What is the capital of France?", "--max-tokens", "32")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_reads_turns_from_stdin():
    r = _braid("chat", "--max-tokens", "24", input_text="What is the capital of France?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bad_flag_value_is_a_clear_error(tmp_path):
    r = _braid("generate", "hi", "--max-tokens", "0")
    assert r.returncode == 2 and "max_tokens" in r.stderr
    r = _braid("generate", "hi", "--model", "/no/such/model")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _braid("--version")
    assert r.returncode == 0 and r.stdout.startswith("braid ")
    r = _braid("serve", "--port", "70000")
    assert r.returncode == 2 and "--port" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "config.json").write_text('{"model_type": "llama",')  # malformed JSON
    r = _braid("generate", "hi", "--model", str(tmp_path))
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr, r.stderr
