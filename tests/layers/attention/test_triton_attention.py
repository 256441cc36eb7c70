"""Triton paged-attention backend vs the torch reference on random paged batches.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: CPU cases use few tokens and tiny heads.
Bigger shapes and bf16 run under the gpu marker.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from braid.layers.attention.torch_ref import TorchReferenceBackend, write_kv_cache
from tests.layers.attention.test_torch_ref import MIXED, make_paged_batch

pytest.importorskip("triton")

from braid.layers.attention.triton_backend import TritonBackend, choose_num_splits  # noqa: E402
from braid.layers.attention.triton_cache_write import write_kv_cache_triton  # noqa: E402
from braid.layers.attention.triton_decode_attention import split_kv_decode_attention  # noqa: E402
from braid.layers.attention.triton_unified_attention import unified_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(rtol=1e-4, atol=1e-5)


def _tol(dtype: torch.dtype) -> dict:
    return {torch.float32: FP32_TOL, torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}[dtype]


def run_both(batch, backend: TritonBackend, scale: float, sliding_window: int | None = None, dtype=torch.float32):
    """Both backends on their own copy of the cache; checks outputs and written caches."""
    ref_cache, tri_cache = batch.kv_cache.clone(), batch.kv_cache.clone()
    expected = TorchReferenceBackend().forward(batch.q, batch.k, batch.v, ref_cache, batch.metadata, scale, sliding_window)
    # Poison the backend's output buffer: a token the kernels skip stays NaN.
    with mock.patch.object(torch, "empty_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw)):
        out = backend.forward(batch.q, batch.k, batch.v, tri_cache, batch.metadata, scale, sliding_window)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected.float(), **_tol(dtype))
    assert torch.equal(tri_cache, ref_cache)
    return out, expected


def test_cache_write_matches_reference():
    torch.manual_seed(0)
    num_blocks, block_size, hkv, d = 6, 8, 3, 24  # 3 heads, head_dim 24: both padded inside the kernel
    num_tokens = 12
    packed = torch.randn(num_tokens, 2 * hkv * d + 5)  # strided k/v views with a gap
    k = packed[:, : hkv * d].view(num_tokens, hkv, d)
    v = packed[:, hkv * d : 2 * hkv * d].view(num_tokens, hkv, d)
    # 10 tokens have a slot (two of them negative = padding); the last 2 are a padded tail.
    slots = torch.randperm(num_blocks * block_size)[:10]
    slots[3] = -1
    slots[7] = -5
    cache = torch.randn(2, num_blocks, block_size, hkv, d)
    expected = cache.clone()
    write_kv_cache(k, v, expected, slots)
    got = cache.clone().to(DEVICE)
    write_kv_cache_triton(k.to(DEVICE), v.to(DEVICE), got, slots.to(DEVICE))
    assert torch.equal(got.cpu(), expected)
    assert not torch.equal(expected, cache)  # the write did something


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2), (8, 2)])
def test_unified_mixed_batch(num_heads, num_kv_heads):
    query_lens, seq_lens = MIXED
    batch = make_paged_batch(
        query_lens, seq_lens, num_heads, num_kv_heads, 16, 8, device=DEVICE, pad_negative=2, pad_short=1, strided_qkv=True
    )
    out, _ = run_both(batch, TritonBackend(), scale=0.25)
    assert torch.all(out[sum(query_lens) :] == 0)


@pytest.mark.parametrize("sliding_window", [1, 5])
def test_unified_sliding_window(sliding_window):
    query_lens, seq_lens = MIXED
    batch = make_paged_batch(query_lens, seq_lens, 4, 1, 16, 16, device=DEVICE, seed=1)
    run_both(batch, TritonBackend(), scale=0.5, sliding_window=sliding_window)


def test_unified_small_tiles_many_query_tiles():
    # block_m 16 with GQA 3 gives 5-token query tiles (one idle row) and tile_n 16 spans
    # two 8-slot blocks: a long prefill continuation crosses many query and key tiles.
    query_lens, seq_lens = [23, 1, 0, 12], [50, 30, 9, 12]
    batch = make_paged_batch(query_lens, seq_lens, 3, 1, 16, 8, device=DEVICE, seed=2)
    cache = batch.kv_cache.clone()
    expected = TorchReferenceBackend().forward(batch.q, batch.k, batch.v, cache, batch.metadata, 0.3, 7)
    md = batch.metadata
    for window in (None, 7):
        ref = expected if window else TorchReferenceBackend().forward(batch.q, batch.k, batch.v, cache, md, 0.3)
        out = torch.full_like(batch.q, float("nan"))  # poison: every request token must be written
        unified_attention(
            out, batch.q, cache, md.query_start_loc, md.seq_lens, md.block_table, md.max_query_len, 0.3, window,
            block_m=16, tile_n=16,
        )  # fmt: skip
        torch.testing.assert_close(out, ref, **FP32_TOL)


def test_unified_odd_head_dim_fp16():
    # head_dim 24 is padded to 32 with masking; fp16 inputs accumulate in fp32.
    query_lens, seq_lens = [1, 6, 0, 3], [17, 6, 3, 11]
    batch = make_paged_batch(query_lens, seq_lens, 4, 2, 24, 8, dtype=torch.float16, device=DEVICE, seed=3)
    run_both(batch, TritonBackend(), scale=24**-0.5, dtype=torch.float16)


@pytest.mark.parametrize("num_splits", [1, 4, 8])
@pytest.mark.parametrize("sliding_window", [None, 40])
def test_split_kv_decode(num_splits, sliding_window):
    # Decode-only: long contexts, a short one (most of its splits are empty), an empty query.
    query_lens, seq_lens = [1, 1, 0, 1], [300, 7, 50, 129]
    batch = make_paged_batch(query_lens, seq_lens, 4, 2, 16, 16, device=DEVICE, seed=4, pad_short=1)
    md = batch.metadata
    cache = batch.kv_cache.clone()
    expected = TorchReferenceBackend().forward(batch.q, batch.k, batch.v, cache, md, 0.2, sliding_window)
    out = torch.full_like(batch.q, float("nan"))
    split_kv_decode_attention(
        out, batch.q, cache, md.query_start_loc, md.seq_lens, md.block_table, num_splits, 0.2, sliding_window
    )
    n = md.num_actual_tokens
    torch.testing.assert_close(out[:n], expected[:n], **FP32_TOL)
    # Through the backend, forced to split, including the cache write.
    run_both(batch, TritonBackend(num_kv_splits=num_splits), scale=0.2, sliding_window=sliding_window)


def test_split_count_heuristic():
    assert choose_num_splits(max_query_len=5, num_reqs=1, num_kv_heads=8) == 1  # not decode-only
    assert choose_num_splits(1, 1, 8) == 16  # one request: 8 programs alone would idle the GPU (capped)
    assert choose_num_splits(1, 8, 8) == 8
    assert choose_num_splits(1, 5, 8) == 8  # as its padded CUDA-graph bucket (8) would
    assert choose_num_splits(1, 16, 8) == 4
    assert choose_num_splits(1, 32, 8) == 2
    assert choose_num_splits(1, 64, 8) == 1  # enough programs without splitting


def test_split_kv_chosen_automatically_for_long_decode(monkeypatch):
    # The default backend takes the split path on its own for a long decode batch.
    import braid.layers.attention.triton_backend as tb

    calls = []
    real = tb.split_kv_decode_attention
    monkeypatch.setattr(tb, "split_kv_decode_attention", lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    monkeypatch.setattr(tb, "TARGET_PROGRAMS", 8)
    batch = make_paged_batch([1, 1], [200, 90], 2, 1, 16, 16, device=DEVICE, seed=5)
    run_both(batch, TritonBackend(), scale=0.3)
    assert calls == [4]


def test_empty_batch():
    batch = make_paged_batch([0], [5], 2, 1, 16, 8, device=DEVICE, pad_short=2)
    out, _ = run_both(batch, TritonBackend(), scale=1.0)
    assert torch.all(out == 0)


def _gpu_cases():
    # (query_lens, seq_lens) at model-like sizes.
    mixed = ([1] * 6 + [128, 0, 37, 300], [2000, 513, 17, 1, 64, 900, 128, 40, 1100, 1800])
    decode = ([1] * 8, [4000, 31, 2500, 1025, 7, 3333, 1, 640])
    return [mixed, decode]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (8, 8, 80)])
@pytest.mark.parametrize("sliding_window", [None, 256])
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_large(dtype, num_heads, num_kv_heads, head_dim, sliding_window, block_size):
    for i, (query_lens, seq_lens) in enumerate(_gpu_cases()):
        batch = make_paged_batch(
            query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype=dtype, device="cuda",
            pad_negative=3, pad_short=2, seed=10 + i, strided_qkv=True,
        )  # fmt: skip
        scale = head_dim**-0.5
        for splits in (None, 1, 16):  # heuristic choice, never split, always split decode-only batches
            run_both(batch, TritonBackend(num_kv_splits=splits), scale, sliding_window, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_wide_heads_fit(dtype):
    """MLA's absorbed attention: 16 heads over one 576-wide latent + rotary entry (padded to
    1024), decode and prefill, within the GPU's shared memory."""
    for i, (query_lens, seq_lens) in enumerate(_gpu_cases()):
        batch = make_paged_batch(query_lens, seq_lens, 16, 1, 576, 16, dtype=dtype, device="cuda", seed=30 + i)
        for splits in (None, 1, 16):
            run_both(batch, TritonBackend(num_kv_splits=splits), 576**-0.5, None, dtype)
