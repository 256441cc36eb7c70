"""Gated activations. On CUDA the fused Triton kernel
(braid.layers.triton_ops.silu_mul) runs; silu_and_mul_ref is its torch
reference and the CPU path."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up (half the width)."""
    if x.is_cuda:
        from braid.layers.triton_ops.silu_mul import silu_and_mul as triton_silu_and_mul  # triton only with CUDA

        return triton_silu_and_mul(x)
    return silu_and_mul_ref(x)


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim -> silu(gate) * up (half the width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


def require_silu(hidden_act: str, what: str) -> None:
    """The gated MLPs here compute SiLU(gate) * up; 'swish' is transformers' alias of SiLU."""
    if hidden_act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {hidden_act!r} for {what}: only 'silu' is implemented")
