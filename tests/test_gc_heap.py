"""freeze_startup_heap moves the start-up heap out of the collector's reach, once."""
import subprocess
import sys

SCRIPT = """
import gc
from braid.gc_heap import freeze_startup_heap
import transformers  # a start-up heap worth freezing
assert gc.get_freeze_count() == 0
freeze_startup_heap()
frozen = gc.get_freeze_count()
assert frozen > 10_000, frozen
later = [[i] for i in range(1000)]  # objects made after start-up stay collectable
freeze_startup_heap()
assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)
print("ok")
"""


def test_freeze_once_and_only_the_startup_heap():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
