"""RMSNorm with an optional fused residual add (vLLM's convention).

forward(x) -> normed x
forward(x, residual) -> (normed (x + residual), x + residual)

The add is done in the input dtype and the normalisation in float32, as in
HF transformers' LlamaRMSNorm, so float32 results match it bit for bit.
On CUDA the fused Triton kernels (braid.layers.triton_ops.rms_norm) run
instead; rms_norm_ref / add_rms_norm_ref below are their torch reference and
the CPU path. Neither path modifies its inputs.
"""
from __future__ import annotations

import torch
from torch import nn


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + residual
    return rms_norm_ref(x, weight, eps), x


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda and (residual is None or residual.dtype == x.dtype):
            # Imported here: triton is only needed (and only installed) where CUDA is.
            from braid.layers.triton_ops.rms_norm import add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.variance_epsilon)
            return add_rms_norm(x, residual, self.weight, self.variance_epsilon)
        if residual is None:
            return rms_norm_ref(x, self.weight, self.variance_epsilon)
        return add_rms_norm_ref(x, residual, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"
