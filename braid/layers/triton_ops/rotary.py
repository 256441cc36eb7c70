"""Triton rotary embedding (rotate-half / NeoX layout), in place over q and k.

Torch reference: braid.layers.rotary.rotary_embedding_ref. One program per
token rotates all of its q heads and k heads in one launch. q and k may be
strided views (slices of the fused qkv output): each has its own token and
head strides, and only the first rotary_dim lanes of each head are touched.

Rounding follows the reference (and HF): cos/sin cast to the input dtype, each
product rounded to it, then the sum; in bf16/fp16 that is bit for bit.

With `cache_write=(v, kv_cache, slot_mapping)` (whole-head rotary only) the same
program also stores the token's rotated keys and its values into the paged KV
cache, as braid.layers.attention.triton_cache_write would: one launch instead of
two per layer, and the rotated keys are stored from registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid.layers.triton_ops.pdl import pdl_enter, pdl_launch


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
    return o1.to(dtype), o2.to(dtype), h, mask


@triton.jit(do_not_specialize=["num_slots"])  # see triton_ops/__init__.py
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    num_q_heads, num_k_heads, half,
    v_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, num_slots, block_size,
    stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr, HALF_PAD: tl.constexpr, WRITE_KV: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_enter(USE_PDL)
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
    k1, k2, h, mask = _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, c1, c2, s1, s2, j, j_mask,
                                    half, HK_PAD)
    if WRITE_KV:
        slot = tl.load(slot_ptr + t, mask=t < num_slots, other=-1)
        if slot >= 0:  # padding tokens (beyond the slot mapping, or slot -1) are not written
            # int64: block * stride_cb overflows int32 for caches above 2^31 elements.
            dst = (slot // block_size).to(tl.int64) * stride_cb + (slot % block_size) * stride_cs \
                + h * stride_ch + j[None, :]
            tl.store(key_cache_ptr + dst, k1, mask=mask)
            tl.store(key_cache_ptr + dst + half, k2, mask=mask)
            src = v_ptr + t * stride_vt + h * stride_vh + j[None, :]
            tl.store(value_cache_ptr + dst, tl.load(src, mask=mask), mask=mask)
            tl.store(value_cache_ptr + dst + half, tl.load(src + half, mask=mask), mask=mask)


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
    cache_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Rotate q [T, Hq*D] and k [T, Hk*D] in place at `positions` [T] (first rotary_dim lanes per head).

    cos_cache/sin_cache: [max_position, rotary_dim] (any float dtype; unit last
    stride, same row stride). Positions are read on the device: no host sync.
    cache_write = (v [T, Hk*D] or [T, Hk, D], kv_cache [2, blocks, block_size, Hk, D],
    slot_mapping [<= T]): also store each token's rotated k and its v at its slot
    (negative slot or beyond the mapping: skipped); needs rotary_dim == head_dim.
    """
    assert q.dtype == k.dtype and rotary_dim % 2 == 0 and rotary_dim <= head_dim
    assert cos_cache.stride() == sin_cache.stride() and cos_cache.stride(-1) == 1
    num_tokens = positions.shape[0]
    hq, sqt, sqh = _token_head_strides(q, head_dim)
    hk, skt, skh = _token_head_strides(k, head_dim)
    assert q.shape[0] == num_tokens and k.shape[0] == num_tokens
    if num_tokens == 0:
        return
    if cache_write is not None:
        v, kv_cache, slot_mapping = cache_write
        assert rotary_dim == head_dim, "the fused cache write stores whole heads"
        _, svt, svh = _token_head_strides(v, head_dim)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        assert key_cache.shape[2:] == (hk, head_dim) and key_cache.stride(3) == 1
        kv_args = (v, key_cache, value_cache, slot_mapping, slot_mapping.shape[0], key_cache.shape[1],
                   svt, svh, key_cache.stride(0), key_cache.stride(1), key_cache.stride(2))
    else:
        kv_args = (q, q, q, positions, 0, 1, 0, 0, 0, 0, 0)  # unused: WRITE_KV is off
    half = rotary_dim // 2
    pad_q, pad_k = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    tile = max(pad_q, pad_k) * triton.next_power_of_2(half)
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_cache, sin_cache,
        sqt, sqh, skt, skh, cos_cache.stride(0),
        hq, hk, half, *kv_args,
        HQ_PAD=pad_q, HK_PAD=pad_k, HALF_PAD=triton.next_power_of_2(half), WRITE_KV=cache_write is not None,
        num_warps=4 if tile <= 2048 else 8, **pdl_launch(q, num_tokens),
    )
