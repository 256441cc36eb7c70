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
freeze_startup_heap()
assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)
import weakref
class Node: pass
later = Node(); later.cycle = later; alive = weakref.ref(later)
del later
gc.collect()
assert alive() is None  # a cycle made after start-up is still collected
print("ok")
"""


def test_freeze_once_and_only_the_startup_heap():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


WORKER_SCRIPT = """
import gc, sys
from braid.engine.arg_utils import EngineArgs
from braid.executor.worker_setup import start_worker, destroy_process_group
config = EngineArgs(model=sys.argv[1], kv_cache_memory="4MiB", max_model_len=64).create_engine_config()
assert gc.get_freeze_count() == 0
worker, tracer = start_worker(0, config, "file://" + sys.argv[2], cuda_index=0)
assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()
destroy_process_group()
print("ok")
"""


def test_worker_processes_freeze_their_startup_heap(tmp_path):
    # Every rank of a pipeline stalls behind one rank's full collection.
    from tests.tiny_checkpoints import make_tiny_checkpoint

    model = make_tiny_checkpoint("llama", tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(model), str(tmp_path / "rdzv")],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
