"""Test-wide setup: Triton kernels run in its interpreter when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
