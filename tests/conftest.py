"""Test-wide setup: Triton kernels run in its interpreter when no GPU is present; braid's disk
cache (the GGUF tokenizer) lives in a folder of this session, not the user's ~/.cache."""
import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Set at import, before any test or subprocess starts; subprocesses inherit it.
_session_cache = tempfile.mkdtemp(prefix="braid-test-cache-")
os.environ["BRAID_CACHE_ROOT"] = _session_cache
atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)
