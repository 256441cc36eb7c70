"""Triton RMSNorm, optionally fused with the residual add: one program per row.

Torch reference: braid.layers.norm.rms_norm_ref / add_rms_norm_ref. The kernel
rounds where the reference rounds (the add in the input dtype, the normalised
row cast to the input dtype before the weight multiply), with fp32 math in
between, so results differ from it only by reduction order and rsqrt.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid.layers.triton_ops.pdl import pdl_enter, pdl_launch

# One block holds the whole row; beyond this the row would not fit in registers.
MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_cols, rows_b, eps,
    sx_a, sx_b, sr_a, sr_b, so_a, so_b, sro_a, sro_b,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_enter(USE_PDL)
    # Rows are indexed [a, b] so a per-head norm over a strided [T, H, D] view
    # (Qwen3's q_norm on a slice of qkv) needs no copy; 2-D inputs have rows_b = 1.
    row = tl.program_id(0).to(tl.int64)
    a = row // rows_b
    b = row % rows_b
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + a * sx_a + b * sx_b + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + a * sr_a + b * sr_b + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the input dtype, as torch's `x + residual` does.
        x = (x + r).to(dtype).to(tl.float32)
        tl.store(res_out_ptr + a * sro_a + b * sro_b + cols, x, mask=mask)
    var = tl.sum(x * x, axis=0) / n_cols  # padded columns load as 0
    h = (x * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # Every load of this row happened above, so out/res_out may alias x/residual.
    tl.store(out_ptr + a * so_a + b * so_b + cols, w * h, mask=mask)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """t as [A, B, N] with unit last stride, plus the A and B strides."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() == 2:
        return t.unsqueeze(1), t.stride(0), 0
    t = t.flatten(0, -3)  # a view when the leading dims merge, else a copy
    return t, t.stride(0), t.stride(1)


def _launch(x, residual, weight, out, res_out, eps: float) -> None:
    n = x.shape[-1]
    assert weight.shape == (n,) and weight.is_contiguous(), "weight must be a contiguous [hidden] vector"
    assert n <= MAX_HIDDEN, f"hidden size {n} above the fused kernel's limit {MAX_HIDDEN}"
    x3, sx_a, sx_b = _rows(x)
    o3, so_a, so_b = _rows(out)
    a, b = x3.shape[0], x3.shape[1]
    if a * b == 0:
        return
    if residual is not None:
        r3, sr_a, sr_b = _rows(residual)
        ro3, sro_a, sro_b = _rows(res_out)
    else:
        r3 = ro3 = x3
        sr_a = sr_b = sro_a = sro_b = 0
    block = triton.next_power_of_2(n)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(a * b,)](
        x3, r3, weight, o3, ro3, n, b, eps,
        sx_a, sx_b, sr_a, sr_b, so_a, so_b, sro_a, sro_b,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps, **pdl_launch(x3, a),
    )


def _check_writable(t: torch.Tensor, name: str) -> None:
    # _rows may copy other layouts; writing into that copy would be lost.
    assert t.stride(-1) == 1 and t.dim() <= 3, f"{name} is written in place: needs <= 3 dims, unit last stride"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """normed x in a new contiguous tensor of dtype promote(weight, x), like the reference."""
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(x, None, weight, out, None, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed(x + residual), x + residual) in new tensors; the inputs are left as they were."""
    assert x.dtype == residual.dtype and x.shape == residual.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, out, res_out, eps)
    return out, res_out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place, as vLLM's: residual <- x + residual, then x <- normed(residual) (cast to x's dtype)."""
    assert x.dtype == residual.dtype and x.shape == residual.shape
    _check_writable(x, "x")
    _check_writable(residual, "residual")
    _launch(x, residual, weight, x, residual, eps)
