"""Fused Triton decoder ops (braid.layers.triton_ops) vs their torch references.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes here are small. The interpreter casts fp32 to
bf16 by truncation (the GPU rounds to nearest), hence bf16's tolerance even
where the kernels round exactly like the reference. The gpu-marked tests run
the layers' CUDA path against their torch path at Llama-3-8B sizes.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from braid.layers.activation import SiluAndMul, silu_and_mul_ref  # noqa: E402
from braid.layers.norm import RMSNorm, add_rms_norm_ref, rms_norm_ref  # noqa: E402
from braid.layers.rotary import RotaryEmbedding, _rotate_half, rotary_embedding_ref  # noqa: E402
from braid.layers.triton_ops.rms_norm import add_rms_norm, fused_add_rms_norm, rms_norm  # noqa: E402
from braid.layers.attention.torch_ref import write_kv_cache  # noqa: E402
from braid.layers.triton_ops.rotary import rotary_embedding_  # noqa: E402
from braid.layers.triton_ops.silu_mul import silu_and_mul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def tol(dtype: torch.dtype) -> dict:
    # bf16: a few truncations in the interpreter can stack up to ~3 ulps; one ulp on GPU.
    bf16 = dict(rtol=3e-2, atol=3e-2) if DEVICE == "cpu" else dict(rtol=1.6e-2, atol=1e-2)
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
            torch.bfloat16: bf16}[dtype]


def randn(*shape, dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


_empty = torch.empty


def poisoned_empty(*args, **kwargs):
    """torch.empty filled with NaN: an output element the kernel skips stays NaN."""
    return _empty(*args, **kwargs).fill_(float("nan"))


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 80), (3, 576)])
def test_rms_norm_and_add_match_reference(dtype, tokens, hidden):
    x, res = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype, seed=1)
    w = (torch.rand(hidden) + 0.5).to(dtype).to(DEVICE)
    x0, res0 = x.clone(), res.clone()
    with mock.patch.object(torch, "empty", poisoned_empty):
        out = rms_norm(x, w, 1e-6)
        out2, new_res = add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6), **tol(dtype))
    ref_out, ref_res = add_rms_norm_ref(x, res, w, 1e-6)
    torch.testing.assert_close(new_res, ref_res, **tol(dtype))
    torch.testing.assert_close(out2, ref_out, **tol(dtype))
    assert torch.equal(x, x0) and torch.equal(res, res0)  # the out-of-place forms leave inputs alone


def test_rms_norm_fp32_weight_promotes_like_reference():
    x, w = randn(5, 48, dtype=torch.bfloat16), torch.rand(48, device=DEVICE) + 0.5
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-5), **tol(torch.bfloat16))


def test_rms_norm_per_head_on_strided_qkv_view():
    """Qwen3's q_norm: [T, H, D] view of a slice of the fused qkv output, no copy."""
    tokens, heads, kv_heads, d = 5, 4, 2, 32
    qkv = randn(tokens, (heads + 2 * kv_heads) * d)
    q = qkv[:, : heads * d].reshape(tokens, heads, d)
    assert q.data_ptr() == qkv.data_ptr() and not q.is_contiguous()
    w = torch.rand(d, device=DEVICE) + 0.5
    with mock.patch.object(torch, "empty", poisoned_empty):
        out = rms_norm(q, w, 1e-6)
    torch.testing.assert_close(out, rms_norm_ref(q, w, 1e-6), **tol(torch.float32))
    out.view(tokens, heads * d)  # contiguous, as the model's .view() needs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_in_place_on_views(dtype):
    tokens, hidden = 5, 96
    # x and residual are column slices: in place must honour the row stride and
    # leave the neighbouring columns alone.
    big_x, big_r = randn(tokens, 2 * hidden, dtype=dtype), randn(tokens, hidden + 8, dtype=dtype, seed=1)
    x, res = big_x[:, :hidden], big_r[:, 8:]
    w = (torch.rand(hidden) + 0.5).to(dtype).to(DEVICE)
    ref_out, ref_res = add_rms_norm_ref(x, res, w, 1e-6)
    keep_x, keep_r = big_x[:, hidden:].clone(), big_r[:, :8].clone()
    fused_add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(res, ref_res, **tol(dtype))
    torch.testing.assert_close(x, ref_out, **tol(dtype))
    assert torch.equal(big_x[:, hidden:], keep_x) and torch.equal(big_r[:, :8], keep_r)


def test_rms_norm_zero_tokens():
    x, w = randn(0, 64), torch.ones(64, device=DEVICE)
    assert rms_norm(x, w, 1e-6).shape == (0, 64)
    out, res = add_rms_norm(x, x.clone(), w, 1e-6)
    assert out.shape == res.shape == (0, 64)
    fused_add_rms_norm(x, x.clone(), w, 1e-6)


# ---------------------------------------------------------------- rotary


def fused_qkv(tokens, heads, kv_heads, head_dim, dtype, seed=0):
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return qkv, q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim,rotary_dim,scaling",
    [(1, 4, 2, 32, 32, None), (5, 4, 4, 16, 16, {"rope_type": "linear", "factor": 2.0}),
     (3, 6, 2, 32, 16, LLAMA3), (7, 3, 1, 64, 64, None)],
    ids=["T1-gqa", "odd-mha-linear", "partial-llama3", "T7-3heads"],
)
def test_rotary_in_place_matches_reference(dtype, tokens, heads, kv_heads, head_dim, rotary_dim, scaling):
    rope = RotaryEmbedding(head_dim, rotary_dim, max_position=128, rope_scaling=scaling).to(DEVICE)
    qkv, q, k, v = fused_qkv(tokens, heads, kv_heads, head_dim, dtype)
    assert q.stride(0) == qkv.shape[1] and q.data_ptr() == qkv.data_ptr()  # a view with the qkv row stride
    positions = torch.randint(0, 128, (tokens,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    positions[0] = 127
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, rope.cos_cache, rope.sin_cache, head_dim, rotary_dim)
    before = qkv.clone()
    rotary_embedding_(positions, q, k, rope.cos_cache, rope.sin_cache, head_dim, rotary_dim)
    torch.testing.assert_close(q, ref_q, **tol(dtype))  # the views themselves were rotated
    torch.testing.assert_close(k, ref_k, **tol(dtype))
    assert torch.equal(v, before[:, (heads + kv_heads) * head_dim:])  # v untouched
    if rotary_dim < head_dim:  # lanes past rotary_dim are left as they were
        for new, old in ((q, before[:, : heads * head_dim]), (k, before[:, heads * head_dim:(heads + kv_heads) * head_dim])):
            assert torch.equal(new.view(tokens, -1, head_dim)[..., rotary_dim:],
                               old.reshape(tokens, -1, head_dim)[..., rotary_dim:])


def test_rotary_three_dim_views_and_zero_tokens():
    rope = RotaryEmbedding(16, max_position=32).to(DEVICE)
    qkv, q, k, _ = fused_qkv(3, 2, 1, 16, torch.float32)
    positions = torch.tensor([4, 0, 31], device=DEVICE)
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, rope.cos_cache, rope.sin_cache, 16, 16)
    rotary_embedding_(positions, q.view(3, 2, 16), k.view(3, 1, 16), rope.cos_cache, rope.sin_cache, 16, 16)
    torch.testing.assert_close(q, ref_q, **tol(torch.float32))
    torch.testing.assert_close(k, ref_k, **tol(torch.float32))
    _, q0, k0, _ = fused_qkv(0, 2, 1, 16, torch.float32)
    rotary_embedding_(positions[:0], q0, k0, rope.cos_cache, rope.sin_cache, 16, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("three_dim", [False, True], ids=["flat", "3d"])
def test_rotary_with_cache_write_matches_rotary_then_write(dtype, three_dim):
    """One launch rotates q/k in place and stores the rotated k and v at their slots, as the
    rotary kernel followed by the cache write would; padding (slot -1, and tokens past a
    shorter slot mapping) writes nothing."""
    tokens, heads, kv_heads, head_dim, block_size = 6, 4, 2, 32, 4
    rope = RotaryEmbedding(head_dim, max_position=64).to(DEVICE)
    qkv, q, k, v = fused_qkv(tokens, heads, kv_heads, head_dim, dtype)
    positions = torch.tensor([3, 9, 0, 63, 17, 5], device=DEVICE)
    slots = torch.tensor([13, -1, 2, 7, 30], device=DEVICE)  # token 1 padding, token 5 past the mapping
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, rope.cos_cache, rope.sin_cache, head_dim, head_dim)
    shape = (2, 8, block_size, kv_heads, head_dim)
    want = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    write_kv_cache(ref_k.view(tokens, kv_heads, head_dim), v.reshape(tokens, kv_heads, head_dim), want, slots)
    cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    views = [x.view(tokens, -1, head_dim) if three_dim else x for x in (q, k, v)]
    rotary_embedding_(positions, views[0], views[1], rope.cos_cache, rope.sin_cache, head_dim, head_dim,
                      cache_write=(views[2], cache, slots))
    torch.testing.assert_close(q, ref_q, **tol(dtype))
    torch.testing.assert_close(k, ref_k, **tol(dtype))
    written = ~torch.isnan(want)
    assert torch.equal(written, ~torch.isnan(cache))  # the same slots, no others
    torch.testing.assert_close(cache[written], want[written], **tol(dtype))


def test_rotary_cache_write_refuses_partial_rotary():
    rope = RotaryEmbedding(32, 16, max_position=8).to(DEVICE)
    _, q, k, v = fused_qkv(2, 2, 1, 32, torch.float32)
    cache = torch.zeros(2, 2, 4, 1, 32, device=DEVICE)
    with pytest.raises(AssertionError, match="whole heads"):
        rotary_embedding_(torch.tensor([0, 1], device=DEVICE), q, k, rope.cos_cache, rope.sin_cache, 32, 16,
                          cache_write=(v, cache, torch.tensor([0, 1], device=DEVICE)))


# ---------------------------------------------------------------- SiLU and mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 80), (5, 2 * 1100), (2, 3, 48)], ids=["T1", "multi-block", "3d"])
def test_silu_and_mul_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype) * 3
    x0 = x.clone()
    with mock.patch.object(torch, "empty", poisoned_empty):
        out = silu_and_mul(x)
    assert out.shape == shape[:-1] + (shape[-1] // 2,) and out.dtype == dtype
    torch.testing.assert_close(out, silu_and_mul_ref(x), **tol(dtype))
    assert torch.equal(x, x0)


def test_silu_and_mul_strided_rows_and_zero_tokens():
    big = randn(4, 100)
    x = big[:, :64]  # row stride 100
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **tol(torch.float32))
    assert silu_and_mul(randn(0, 64)).shape == (0, 32)


# ---------------------------------------------------------------- layers on CPU: unchanged


def test_cpu_layers_are_exactly_the_original_torch_code():
    """The layers' CPU path is the reference, bit for bit what it was before the kernels."""
    for dtype in (torch.float32, torch.bfloat16):
        norm = RMSNorm(40, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(40) + 0.5)
        norm = norm.to(dtype)
        x, res = randn(6, 40, dtype=dtype, device="cpu"), randn(6, 40, dtype=dtype, seed=1, device="cpu")

        def old_norm(h):
            h32 = h.to(torch.float32)
            h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)
            return norm.weight * h32.to(dtype)

        assert torch.equal(norm(x), old_norm(x))
        out, new_res = norm(x, res)
        assert torch.equal(new_res, x + res) and torch.equal(out, old_norm(x + res))

        rope = RotaryEmbedding(16, 8, max_position=64)
        _, q, k, _ = fused_qkv(6, 2, 1, 16, dtype, seed=3)
        q, k = q.cpu(), k.cpu()
        q0 = q.clone()
        positions = torch.tensor([0, 5, 63, 2, 2, 9])
        cos = rope.cos_cache[positions].to(dtype).unsqueeze(1)
        sin = rope.sin_cache[positions].to(dtype).unsqueeze(1)

        def old_rope(t):
            t = t.view(6, -1, 16)
            rot = t[..., :8]
            return torch.cat((rot * cos + _rotate_half(rot) * sin, t[..., 8:]), dim=-1).reshape(6, -1)

        oq, ok = rope(positions, q, k)
        assert torch.equal(oq, old_rope(q)) and torch.equal(ok, old_rope(k))
        assert torch.equal(q, q0)  # CPU returns new tensors

        y = randn(3, 48, dtype=dtype, device="cpu")
        assert torch.equal(SiluAndMul()(y), F.silu(y[:, :24]) * y[:, 24:])


# ---------------------------------------------------------------- GPU: the layers' CUDA path


GPU_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 1, 7, 513])
def test_gpu_layers_match_torch_path(dtype, tokens):
    hidden, heads, kv_heads, d, inter = 4096, 32, 8, 128, 14336
    norm = RMSNorm(hidden, eps=1e-5).cuda()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden) + 0.5)
    norm = norm.to(dtype)
    x, res = randn(tokens, hidden, dtype=dtype, device="cuda"), randn(tokens, hidden, dtype=dtype, seed=1, device="cuda")
    torch.testing.assert_close(norm(x), rms_norm_ref(x, norm.weight, 1e-5), **GPU_TOL[dtype])
    out, new_res = norm(x, res)
    ref_out, ref_res = add_rms_norm_ref(x, res, norm.weight, 1e-5)
    assert torch.equal(new_res, ref_res)  # one rounding of the same add
    torch.testing.assert_close(out, ref_out, **GPU_TOL[dtype])

    # Qwen3-style per-head norm of a strided q view
    qkv, q, k, v = fused_qkv(tokens, heads, kv_heads, d, dtype, seed=2)
    qn = RMSNorm(d, eps=1e-6).cuda().to(dtype)
    q3 = q.reshape(tokens, heads, d)
    torch.testing.assert_close(qn(q3), rms_norm_ref(q3, qn.weight, 1e-6), **GPU_TOL[dtype])

    rope = RotaryEmbedding(d, max_position=8192, base=500000.0, rope_scaling=dict(LLAMA3, original_max_position_embeddings=8192)).cuda()
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, rope.cos_cache, rope.sin_cache, d, d)
    v0 = v.clone()
    oq, ok = rope(positions, q, k)
    assert oq.data_ptr() == q.data_ptr()  # rotated in place
    torch.testing.assert_close(oq, ref_q, **GPU_TOL[dtype])
    torch.testing.assert_close(ok, ref_k, **GPU_TOL[dtype])
    assert torch.equal(v, v0)

    g = randn(tokens, 2 * inter, dtype=dtype, device="cuda") * 3
    torch.testing.assert_close(SiluAndMul()(g), silu_and_mul_ref(g), **GPU_TOL[dtype])


@pytest.mark.gpu
def test_gpu_kernels_capture_in_cuda_graph():
    """No host syncs: the three ops replay from a CUDA graph on fresh inputs."""
    dtype, tokens, hidden, d = torch.bfloat16, 8, 4096, 128
    norm = RMSNorm(hidden).cuda().to(dtype)
    rope = RotaryEmbedding(d, max_position=4096).cuda()
    act = SiluAndMul()
    x, res = randn(tokens, hidden, dtype=dtype, device="cuda"), randn(tokens, hidden, dtype=dtype, seed=1, device="cuda")
    qkv = randn(tokens, 48 * d, dtype=dtype, device="cuda")
    positions = torch.arange(tokens, device="cuda")

    def step():
        h, r = norm(x, res)
        q, k, _ = qkv.split([32 * d, 8 * d, 8 * d], dim=-1)
        q, k = rope(positions, q, k)
        return act(torch.cat([h, r], dim=-1)), q.clone()

    step()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x.copy_(randn(tokens, hidden, dtype=dtype, seed=5, device="cuda"))
    positions.copy_(torch.arange(100, 100 + tokens, device="cuda"))
    qkv.copy_(randn(tokens, 48 * d, dtype=dtype, seed=6, device="cuda"))
    qkv_before = qkv.clone()
    graph.replay()
    h, r = add_rms_norm_ref(x, res, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(outs[0], silu_and_mul_ref(torch.cat([h, r], dim=-1)), **GPU_TOL[dtype])
    q, k, _ = qkv_before.split([32 * d, 8 * d, 8 * d], dim=-1)
    ref_q, _ = rotary_embedding_ref(positions, q, k, rope.cos_cache, rope.sin_cache, d, d)
    torch.testing.assert_close(outs[1], ref_q, **GPU_TOL[dtype])
