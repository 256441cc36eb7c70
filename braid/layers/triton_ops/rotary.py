"""Triton rotary embedding (rotate-half / NeoX layout), in place over q and k.

Torch reference: braid.layers.rotary.rotary_embedding_ref. One program per
token rotates all of its q heads and k heads in one launch. q and k may be
strided views (slices of the fused qkv output): each has its own token and
head strides, and only the first rotary_dim lanes of each head are touched.

Rounding follows the reference (and HF): cos/sin cast to the input dtype, each
product rounded to it, then the sum; in bf16/fp16 that is bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(base, stride_h, num_heads, c1, c2, s1, s2, j, j_mask, half, HEADS_PAD: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    mask = (h < num_heads) & j_mask[None, :]
    p1 = base + h * stride_h + j[None, :]
    p2 = p1 + half
    dtype = base.dtype.element_ty
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    # out1 = x1*cos1 - x2*sin1, out2 = x2*cos2 + x1*sin2, rounding each product like torch.
    o1 = (x1 * c1[None, :]).to(dtype).to(tl.float32) - (x2 * s1[None, :]).to(dtype).to(tl.float32)
    o2 = (x2 * c2[None, :]).to(dtype).to(tl.float32) + (x1 * s2[None, :]).to(dtype).to(tl.float32)
    tl.store(p1, o1, mask=mask)
    tl.store(p2, o2, mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    num_q_heads, num_k_heads, half,
    HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    j_mask = j < half
    dtype = q_ptr.dtype.element_ty
    # Both halves of the cache row are read (they are equal for every rope type
    # here, but the reference uses them as stored).
    row = pos * stride_cache
    c1 = tl.load(cos_ptr + row + j, mask=j_mask, other=0.0).to(dtype).to(tl.float32)
    c2 = tl.load(cos_ptr + row + half + j, mask=j_mask, other=0.0).to(dtype).to(tl.float32)
    s1 = tl.load(sin_ptr + row + j, mask=j_mask, other=0.0).to(dtype).to(tl.float32)
    s2 = tl.load(sin_ptr + row + half + j, mask=j_mask, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, c1, c2, s1, s2, j, j_mask, half, HQ_PAD)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, c1, c2, s1, s2, j, j_mask, half, HK_PAD)


def _token_head_strides(x: torch.Tensor, head_dim: int) -> tuple[int, int, int]:
    """(num_heads, token stride, head stride) of x: [T, H*D] (heads D apart) or [T, H, D]."""
    assert x.stride(-1) == 1, "q/k are rotated in place and need a unit last stride"
    if x.dim() == 2:
        assert x.shape[1] % head_dim == 0
        return x.shape[1] // head_dim, x.stride(0), head_dim
    assert x.dim() == 3 and x.shape[2] == head_dim
    return x.shape[1], x.stride(0), x.stride(1)


def rotary_embedding_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    head_dim: int,
    rotary_dim: int,
) -> None:
    """Rotate q [T, Hq*D] and k [T, Hk*D] in place at `positions` [T] (first rotary_dim lanes per head).

    cos_cache/sin_cache: [max_position, rotary_dim] (any float dtype; unit last
    stride, same row stride). Positions are read on the device: no host sync.
    """
    assert q.dtype == k.dtype and rotary_dim % 2 == 0 and rotary_dim <= head_dim
    assert cos_cache.stride() == sin_cache.stride() and cos_cache.stride(-1) == 1
    num_tokens = positions.shape[0]
    hq, sqt, sqh = _token_head_strides(q, head_dim)
    hk, skt, skh = _token_head_strides(k, head_dim)
    assert q.shape[0] == num_tokens and k.shape[0] == num_tokens
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    pad_q, pad_k = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    tile = max(pad_q, pad_k) * triton.next_power_of_2(half)
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_cache, sin_cache,
        sqt, sqh, skt, skh, cos_cache.stride(0),
        hq, hk, half,
        HQ_PAD=pad_q, HK_PAD=pad_k, HALF_PAD=triton.next_power_of_2(half),
        num_warps=4 if tile <= 2048 else 8,
    )
