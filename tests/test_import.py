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
