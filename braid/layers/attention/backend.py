"""The one interface every attention backend implements.

KV cache layout, per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = keys, 1 = values). A backend first writes this step's k/v into the
cache at metadata.slot_mapping, then computes causal attention of every query
token over its request's whole context read from the cache.
"""
from __future__ import annotations

from typing import Protocol

import torch

from braid.layers.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def get_attention_backend(name: str) -> AttentionBackend:
    """name: 'torch' (reference, any device) or 'triton' (paged kernels, GPU or TRITON_INTERPRET=1)."""
    if name == "torch":
        from braid.layers.attention.torch_ref import TorchReferenceBackend

        return TorchReferenceBackend()
    if name == "triton":
        from braid.layers.attention.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"--attention-backend must be 'auto', 'torch' or 'triton', got {name!r}")
