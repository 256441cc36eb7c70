import subprocess
import sys


def test_import_braid_stays_light():
    code = ("import sys, braid; from braid import LLM, SamplingParams; "
            "heavy = [m for m in ('fastapi', 'uvicorn', 'pydantic', 'zmq', 'ray') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_public_api():
    import braid

    assert braid.SamplingParams and braid.LLM and braid.__version__


def test_cli_parser_builds_without_torch():
    """`braid bench serve` (a load generator) and `braid --help` must not pay torch's import."""
    code = ("import sys; from braid.entrypoints.cli import build_parser; "
            "build_parser().parse_args(['bench', 'serve', '--model', 'm']); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dtype_names_resolve_to_torch_dtypes():
    from types import SimpleNamespace

    import pytest
    import torch

    from braid.config import resolve_dtype

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_dtype("half", None, cpu) is torch.float16
    assert resolve_dtype("bfloat16", None, gpu) is torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype="float16"), gpu) is torch.float16
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype="float32"), gpu) is torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype="float16"), cpu) is torch.float32
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("float8", None, gpu)
