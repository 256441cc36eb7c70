"""Triton kernel: scatter this step's keys/values into the paged KV cache.

Torch reference: braid.layers.attention.torch_ref.write_kv_cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid.layers.triton_ops.pdl import pdl_enter, pdl_launch


@triton.jit
def _write_kv_cache_kernel(
    k_ptr,
    v_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    num_kv_heads,
    head_dim,
    block_size,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,  # cache strides, shared by the key and value halves
    stride_cs,
    stride_ch,
    stride_cd,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_enter(USE_PDL)
    # One program per token: copies all of its kv heads at once.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding token: nothing to write
        return
    block = slot // block_size
    offset = slot % block_size

    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim)

    token64 = token.to(tl.int64)
    k = tl.load(k_ptr + token64 * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(v_ptr + token64 * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    # int64: block * stride_cb overflows int32 for caches above 2^31 elements.
    dst = block.to(tl.int64) * stride_cb + offset * stride_cs + h * stride_ch + d * stride_cd
    # tl.store casts to the cache's dtype, like write_kv_cache's k.to(cache dtype).
    tl.store(key_cache_ptr + dst, k, mask=mask)
    tl.store(value_cache_ptr + dst, v, mask=mask)


def write_kv_cache_triton(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Same contract as torch_ref.write_kv_cache: token t goes to slot_mapping[t]; negative = skip.

    slot_mapping may be shorter than k (padded tail): only its tokens are written.
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    _write_kv_cache_kernel[(num_tokens,)](
        k,
        v,
        key_cache,
        value_cache,
        slot_mapping,
        num_kv_heads,
        head_dim,
        block_size,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        key_cache.stride(3),
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        **pdl_launch(k, num_tokens),
    )
