"""Triton SiLU-and-multiply: x = [gate | up] -> silu(gate) * up.

Torch reference: braid.layers.activation.silu_and_mul_ref. Grid: (row, block of
columns), so each program does contiguous, vectorisable loads. fp32 math,
rounded where the reference rounds (silu's result, then the product).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid.layers.triton_ops.pdl import pdl_enter, pdl_launch


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    # torch's silu: x / (1 + exp(-x)) in fp32, result in the input dtype.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, act * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> silu(x[..., :d]) * x[..., d:] as a new contiguous [..., d] tensor."""
    d = x.shape[-1] // 2
    assert x.shape[-1] == 2 * d
    out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, 2 * d)  # a view for the usual [T, 2d] projection output
    rows = x2.shape[0]
    if rows == 0 or d == 0:
        return out
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](
        x2, out, d, x2.stride(0), d, BLOCK=block, num_warps=4 if block >= 512 else 1, **pdl_launch(x2, rows)
    )
    return out
