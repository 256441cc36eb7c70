"""Attention as a model layer: reshapes q/k/v and calls the backend of the
current forward context with this layer's KV cache."""
from __future__ import annotations

import torch
from torch import nn

from braid.forward_context import get_forward_context, layer_span


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        layer_idx: int,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary=None) -> torch.Tensor:
        """q: [T, num_heads * head_dim], k/v: [T, num_kv_heads * head_dim] -> [T, num_heads * head_dim].
        rotary = (RotaryEmbedding, positions): rotate q and k first — on a backend that can, in
        the same kernel that writes this step's keys and values into the cache."""
        ctx = get_forward_context()
        num_tokens = q.shape[0]
        kv_cache = ctx.kv_caches[self.layer_idx]
        cache_written = False
        if rotary is not None:
            rope, positions = rotary
            if getattr(ctx.backend, "fuses_rope_and_cache_write", False) and rope.rotary_dim == self.head_dim:
                rope.rotate_and_write_cache(positions, q, k, v, kv_cache, ctx.attn_metadata.slot_mapping)
                cache_written = True
            else:
                q, k = rope(positions, q, k)
        with layer_span("attention"):
            out = ctx.backend.forward(
                q.view(num_tokens, self.num_heads, self.head_dim),
                k.view(num_tokens, self.num_kv_heads, self.head_dim),
                v.view(num_tokens, self.num_kv_heads, self.head_dim),
                kv_cache,
                ctx.attn_metadata,
                self.scale,
                self.sliding_window,
                **({"kv_cache_written": True} if cache_written else {}),
            )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
