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


def _braid_here(capsys, *args) -> tuple[int, str, str]:
    """The CLI's main in this process (no interpreter start-up to pay): exit code, stdout, stderr."""
    from braid.entrypoints.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own exits (--version, a bad value)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_flag_value_is_a_clear_error(tmp_path, capsys):
    r = _braid("generate", "hi", "--max-tokens", "0")  # once through a real process: its exit code
    assert r.returncode == 2 and "max_tokens" in r.stderr and "Traceback" not in r.stderr
    code, _, err = _braid_here(capsys, "chat", "--top-p", "5")  # refused before the model loads
    assert code == 2 and "top_p" in err
    code, _, err = _braid_here(capsys, "generate", "hi", "--model", "/no/such/model")
    assert code == 2 and "does not exist" in err
    code, out, _ = _braid_here(capsys, "--version")
    assert code == 0 and out.startswith("braid ")
    code, _, err = _braid_here(capsys, "serve", "--port", "70000")
    assert code == 2 and "--port" in err and "Traceback" not in err
    (tmp_path / "config.json").write_text('{"model_type": "llama",')  # malformed JSON
    code, _, err = _braid_here(capsys, "generate", "hi", "--model", str(tmp_path))
    assert code == 2 and "config.json" in err and "Traceback" not in err, err
