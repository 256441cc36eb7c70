"""Triton skinny GEMM (decode-size linears) vs torch's F.linear.

CPU cases run in the Triton interpreter (tests/conftest.py), so shapes are
small; the gpu-marked case runs `linear()`'s CUDA dispatch at Llama-3-8B sizes.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from braid.layers import linear as linear_mod  # noqa: E402
from braid.layers.triton_ops import skinny_gemm as sk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("m,n,k,config,bias", [
    (1, 64, 256, sk.SkinnyConfig(block_n=64, block_k=128), False),
    (5, 96, 320, sk.SkinnyConfig(block_n=32, block_k=64), True),        # K not a multiple of the tile
    (17, 100, 192, sk.SkinnyConfig(block_n=64, block_k=64), True),      # N ragged, two row blocks of 32
    (40, 64, 512, sk.SkinnyConfig(block_n=32, block_k=64, split_k=3), True),   # uneven K split
    (64, 128, 256, sk.SkinnyConfig(block_n=64, block_k=64, split_k=2), False),
    (100, 64, 128, sk.SkinnyConfig(block_n=32, block_k=64, block_m=128), True),  # every row in one program
    (130, 48, 128, sk.SkinnyConfig(block_n=32, block_k=64, block_m=64, split_k=2), False),  # 3 row blocks
])
def test_skinny_gemm_matches_linear(m, n, k, config, bias):
    x, w = randn(m, k, seed=1), randn(n, k, seed=2)
    b = randn(n, seed=3) if bias else None
    out = sk.skinny_gemm(x, w, b, config)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-4, atol=1e-4)


# The Triton interpreter's tl.dot mis-reads bf16 operands (a 16x16 bf16 dot is off by 1e10
# there), so bf16 is checked on GPU only; fp16 runs the same 16-bit path on CPU.
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_skinny_gemm_half_precision_and_strided_rows(dtype):
    x = randn(8, 2 * 256, seed=4, dtype=dtype)[:, :256]  # row stride 512: a view, not a copy
    w = randn(64, 256, seed=5, dtype=dtype)
    out = sk.skinny_gemm(x, w, None, sk.SkinnyConfig(block_n=32, block_k=128))
    assert out.dtype == dtype
    ref = F.linear(x.float(), w.float())
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_skinny_gemm_rejects_column_major_weight():
    with pytest.raises(ValueError, match="row-major"):
        sk.skinny_gemm(randn(2, 64, seed=6), randn(64, 32, seed=7).t(), None)


def test_config_follows_row_count_and_fits_shared_memory():
    h100 = 232448
    assert sk.config_for_rows(1, shared_memory=h100).block_k == 256
    assert sk.config_for_rows(64, shared_memory=h100).block_k == 128
    assert sk.config_for_rows(64, shared_memory=h100).num_stages == 5
    # 64 rows on an A100: a stage is [64 + 64, 128] bf16 (32 KB); 5 stages would leave no margin.
    assert sk.config_for_rows(64, shared_memory=166912).num_stages == 4
    assert sk.block_m_for(1) == 16 and sk.block_m_for(17) == 32 and sk.block_m_for(64) == 64


def test_linear_stays_on_torch_off_cuda():
    x, w = randn(4, 64, seed=8), randn(32, 64, seed=9)
    with mock.patch.object(sk, "skinny_gemm", side_effect=AssertionError("not on CPU")):
        torch.testing.assert_close(linear_mod.linear(x, w), F.linear(x, w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 7, 16, 33, 64, 65])
def test_linear_dispatch_on_cuda(m):
    """Decode sizes take the skinny GEMM (and agree with cuBLAS); 65 rows and up stay on cuBLAS."""
    x = randn(m, 4096, seed=10, dtype=torch.bfloat16)
    w = randn(6144, 4096, seed=11, dtype=torch.bfloat16) * 0.02
    b = randn(6144, seed=12, dtype=torch.bfloat16)
    with mock.patch.object(sk, "skinny_gemm", wraps=sk.skinny_gemm) as spy:
        out = linear_mod.linear(x.view(1, m, 4096), w, b)
    assert out.shape == (1, m, 6144)
    assert spy.call_count == (1 if m <= linear_mod.SKINNY_MAX_ROWS else 0)
    torch.testing.assert_close(out[0].float(), F.linear(x.float(), w.float(), b.float()), rtol=2e-2, atol=2e-2)

