"""Rotary position embedding (HF's rotate-half / GPT-NeoX layout) with a cos/sin cache.

The cache holds cos and sin for every position up to max_position, computed in
float32 exactly as HF transformers computes them (inv_freq, then
positions * inv_freq, then cos/sin), so float32 outputs match HF.

Supported rope types: default (none), "linear", "llama3", "yarn". Any other type is a
ValueError naming it. `rope_params_from_config` reads rope_theta/rope_scaling
from both transformers 4 (`config.rope_theta`, `config.rope_scaling`) and
transformers 5 (`config.rope_parameters`) configs.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_params_from_config(config: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling dict or None) from an HF config, old or new style."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # per-layer-type parameters (transformers 5): the full-attention ones apply here
        params = params.get("full_attention") or next(iter(params.values()))
    scaling = None
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        scaling = dict(params)
    else:
        theta = getattr(config, "rope_theta", None)
        legacy = getattr(config, "rope_scaling", None)
        scaling = dict(legacy) if isinstance(legacy, dict) and legacy else None
    if theta is None:
        theta = 10000.0
    if scaling is not None:
        scaling.pop("rope_theta", None)
    return float(theta), scaling


def rope_type_of(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type")) or "default"


def compute_inv_freq(
    rotary_dim: int, base: float, scaling: dict | None, max_position: int
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] float32 on CPU, attention scaling of cos/sin), as HF computes them."""
    rope_type = rope_type_of(scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r} (rope_scaling/rope_parameters); supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    arange = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float32)
    inv_freq = 1.0 / (base ** (arange / rotary_dim))
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_context_len = scaling.get("original_max_position_embeddings") or max_position
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_freq_llama)
    elif rope_type == "yarn":
        return _yarn_inv_freq(rotary_dim, base, scaling, max_position)
    return inv_freq, 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071), as HF computes it: interpolated frequencies below the
    correction range, extrapolated above it, a linear ramp between; cos/sin scaled by
    the attention factor."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    # On the CPU, like every frequency here: models are built under a CUDA default device.
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float32) / dim)
    extrapolation = 1 - ramp  # weight of the unscaled frequencies
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, rotary_dim: int) -> torch.Tensor:
    shape = x.shape
    x = x.view(shape[0], math.prod(shape[1:]) // head_dim, head_dim)  # not -1: T may be 0
    if rotary_dim == head_dim:
        out = x * cos + _rotate_half(x) * sin
    else:
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        out = torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
    return out.reshape(shape)


def rotary_embedding_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    head_dim: int,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of triton_ops.rotary.rotary_embedding_ (returns new tensors; HF's rounding)."""
    cos = cos_cache.index_select(0, positions).to(q.dtype).unsqueeze(1)  # [T, 1, rot]
    sin = sin_cache.index_select(0, positions).to(q.dtype).unsqueeze(1)
    return _apply_rotary(q, cos, sin, head_dim, rotary_dim), _apply_rotary(k, cos, sin, head_dim, rotary_dim)


class RotaryEmbedding(nn.Module):
    """forward(positions [T], q [T, Hq*D], k [T, Hk*D]) -> rotated (q, k), same shapes and dtype.

    CPU: new tensors (rotary_embedding_ref). CUDA: the Triton kernel rotates q
    and k in place and returns them.
    """

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int | None = None,
        max_position: int = 4096,
        base: float = 10000.0,
        rope_scaling: dict | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.max_position = max_position
        self.base = base
        self.rope_type = rope_type_of(rope_scaling)
        inv_freq, attention_scaling = compute_inv_freq(self.rotary_dim, base, rope_scaling, max_position)
        # Computed on the CPU (deterministic, as HF does at init), then moved to
        # the default device; float32 [max_position, rotary_dim] each, not in the state dict.
        positions = torch.arange(max_position, dtype=torch.int64, device="cpu").to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        device = torch.get_default_device()
        self.register_buffer("cos_cache", (emb.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("sin_cache", (emb.sin() * attention_scaling).to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda:
            # Triton kernel, in place: q and k (usually views into the qkv
            # projection output, which nothing else reads) are returned rotated.
            from braid.layers.triton_ops.rotary import rotary_embedding_  # triton only where CUDA is

            rotary_embedding_(positions, q, k, self.cos_cache, self.sin_cache, self.head_dim, self.rotary_dim)
            return q, k
        return rotary_embedding_ref(positions, q, k, self.cos_cache, self.sin_cache, self.head_dim, self.rotary_dim)

    def rotate_and_write_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Rotate q and k in place and store k and v at slot_mapping in the paged cache, in one
        Triton launch (CUDA, or the Triton interpreter); whole-head rotary only."""
        from braid.layers.triton_ops.rotary import rotary_embedding_

        rotary_embedding_(positions, q, k, self.cos_cache, self.sin_cache, self.head_dim, self.rotary_dim,
                          cache_write=(v, kv_cache, slot_mapping))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_position={self.max_position}, base={self.base}, rope_type={self.rope_type}"


def get_rope(
    head_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None = None,
    rotary_dim: int | None = None,
) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, rotary_dim, max_position, base, rope_scaling)


def get_rope_from_config(config: Any, head_dim: int) -> RotaryEmbedding:
    base, scaling = rope_params_from_config(config)
    partial = (scaling or {}).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    max_position = int(getattr(config, "max_position_embeddings", None) or 4096)
    return get_rope(head_dim, max_position, base, scaling, rotary_dim=int(head_dim * partial))
