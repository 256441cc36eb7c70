"""Programmatic dependent launch (PDL, Hopper and later) for the decode path's Triton kernels.

A decode step is a chain of short kernels (a batch-1 Llama-3-8B step runs ~330 of them, most
2-80 us), and each one normally starts only after the previous one has drained: its CTAs are
dispatched in the gap. A kernel launched with PDL is dispatched while the previous kernel's
last wave still runs; it waits (`griddepcontrol.wait`) before touching anything, then lets the
next kernel be dispatched (`griddepcontrol.launch_dependents`). Waiting first at the very top
keeps every read after the previous kernel's writes, and at most two kernels of the chain are
ever resident, so nothing older than the previous kernel can still be running. The skinny
GEMM may also pull its first weight tiles into L2 before it waits (weights are never written
by a step).

`BRAID_PDL`: 0 off, 1 on, 2 on with the GEMM's weight prefetch (default: fastest on H100, the
Llama-3-8B decode step at batch 1 / 16 / 64 went 6.04 / 6.59 / 8.08 -> 5.80 / 6.47 / 7.92 ms). Kernels take a
`USE_PDL` constexpr and call `pdl_enter(USE_PDL)` first; launch sites pass `**pdl_launch(t, tokens)`,
which turns PDL on only for steps of at most PDL_MAX_TOKENS tokens.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def pdl_mode() -> int:
    """0 off, 1 wait/launch at every kernel's top, 2 also the GEMM's weight prefetch."""
    value = os.environ.get("BRAID_PDL", "2")
    if value not in ("0", "1", "2"):
        raise ValueError(f"BRAID_PDL must be 0, 1 or 2, not {value!r}")
    return int(value)


@functools.cache
def _device_supports_pdl(device_index: int) -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False  # a Triton without the launch option
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _interpreting() -> bool:
    """Triton's interpreter (any spelling of TRITON_INTERPRET it accepts) has no PDL."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def _mode_for(device_index: int) -> int:
    """Cached: eager steps ask once per kernel launch, hundreds of times a step."""
    mode = pdl_mode()
    return mode if mode and not _interpreting() and _device_supports_pdl(device_index) else 0


def pdl_enabled(t: torch.Tensor) -> int:
    """The PDL mode for kernels over `t` (0 on CPU, before Hopper, or with BRAID_PDL=0)."""
    if not t.is_cuda:
        return 0
    index = t.device.index
    return _mode_for(index if index is not None else torch.cuda.current_device())


# Steps of at most this many tokens run all-Triton chains (the skinny GEMM's range). Larger
# ones call cuBLAS between the Triton kernels, which breaks the chain, and there PDL measured
# 2% slower (batch-256 decode step on H100, docs/performance.md).
PDL_MAX_TOKENS = 64


def pdl_launch(t: torch.Tensor, tokens: int) -> dict:
    """Launch keywords for a kernel with a USE_PDL constexpr over `tokens` token rows on t's device."""
    return {"USE_PDL": True, "launch_pdl": True} if tokens <= PDL_MAX_TOKENS and pdl_enabled(t) else {"USE_PDL": False}


def reset_cache() -> None:
    """Re-read BRAID_PDL and the interpreter switch (tests)."""
    _mode_for.cache_clear()


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """Wait for the previous kernel's writes, then let the next kernel be dispatched."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at `ptrs` (one pointer per line); nothing is returned."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)
