"""Per-forward state (attention metadata, KV caches), held per thread.

Dual-batch overlap runs two micro-batches on two threads, so this state must
never be a module global: each thread sees only the context it set.
"""
from __future__ import annotations

import contextlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

    from braid.layers.attention.backend import AttentionBackend
    from braid.layers.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: "AttentionMetadata | None"
    # One tensor per decoder layer, indexed by the layer's global index.
    kv_caches: "list[torch.Tensor]"
    backend: "AttentionBackend"
    # Eager traced forwards only: layers time their parts on it (see layer_span).
    tracer: Any = None
    # Expert parallelism over data-parallel replicas (all-gather exchange): the token count
    # every replica pads its MoE inputs to this step (None: this forward's own count,
    # as in a CUDA graph, whose size every replica shares).
    dp_padded_tokens: int | None = None


_local = threading.local()


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    previous = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = previous


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("no forward context is set on this thread; run the model inside set_forward_context()")
    return ctx


def dp_padded_tokens() -> int | None:
    """This step's agreed MoE token count across data-parallel replicas, if one is set."""
    ctx = getattr(_local, "ctx", None)
    return None if ctx is None else ctx.dp_padded_tokens


_NO_SPAN = contextlib.nullcontext()


def layer_span(name: str):
    """A GPU span around part of a layer (attention, MoE dispatch/experts/combine) when the
    forward is traced; free otherwise. Never set for CUDA-graph captures."""
    ctx = getattr(_local, "ctx", None)
    if ctx is None or ctx.tracer is None:
        return _NO_SPAN
    return ctx.tracer.gpu_span(name)
