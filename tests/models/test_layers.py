"""Unit tests of the model layers against HF transformers / plain torch references."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from braid.layers.activation import SiluAndMul
from braid.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from braid.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from braid.layers.norm import RMSNorm
from braid.layers.rotary import RotaryEmbedding, get_rope_from_config, rope_params_from_config

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}


@pytest.mark.parametrize(
    "rope_scaling,theta",
    [(None, 10000.0), ({"rope_type": "linear", "factor": 2.0}, 10000.0), (LLAMA3, 500000.0), (YARN, 10000.0),
     ({**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}, 10000.0)],
    ids=["default", "linear", "llama3", "yarn", "yarn-mscale"],
)
def test_rotary_matches_hf(rope_scaling, theta):
    heads, kv_heads, head_dim, tokens = 4, 2, 32, 11
    cfg = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rope_theta=theta,
        rope_scaling=rope_scaling,
    )
    rope = get_rope_from_config(cfg, head_dim)
    hf_rope = LlamaRotaryEmbedding(config=cfg)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, heads * head_dim, generator=gen)
    k = torch.randn(tokens, kv_heads * head_dim, generator=gen)
    positions = torch.tensor([0, 1, 2, 3, 100, 101, 7, 300, 511, 64, 65])
    ours_q, ours_k = rope(positions, q, k)
    cos, sin = hf_rope(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(
        q.view(1, tokens, heads, head_dim).transpose(1, 2),
        k.view(1, tokens, kv_heads, head_dim).transpose(1, 2),
        cos,
        sin,
    )
    torch.testing.assert_close(ours_q, ref_q.transpose(1, 2).reshape(tokens, -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_k, ref_k.transpose(1, 2).reshape(tokens, -1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3, YARN], ids=["default", "llama3", "yarn"])
def test_rotary_builds_under_another_default_device(rope_scaling):
    """Models are built under the GPU as default device; the frequencies are computed on the
    CPU and then moved (the meta device stands in for CUDA here: mixing it with CPU fails)."""
    with torch.device("meta"):
        rope = RotaryEmbedding(32, 32, 128, 10000.0, rope_scaling)
    assert rope.cos_cache.device.type == "meta" and rope.cos_cache.shape == (128, 32)


def test_rotary_reads_old_and_new_style_configs():
    old = SimpleNamespace(rope_theta=1234.0, rope_scaling={"type": "linear", "factor": 3.0})
    theta, scaling = rope_params_from_config(old)
    assert theta == 1234.0 and scaling["factor"] == 3.0
    new = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 99.0})
    assert rope_params_from_config(new)[0] == 99.0
    bare = SimpleNamespace()
    assert rope_params_from_config(bare) == (10000.0, None)
    bad = SimpleNamespace(
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1.0, "factor": 2.0},
        max_position_embeddings=16,
    )
    with pytest.raises(ValueError, match="'dynamic'"):
        get_rope_from_config(bad, 8)


def test_rotary_bfloat16_follows_hf():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    rope = get_rope_from_config(cfg, 32)
    q = torch.randn(5, 64).to(torch.bfloat16)
    k = torch.randn(5, 64).to(torch.bfloat16)
    positions = torch.arange(5)
    oq, ok = rope(positions, q, k)
    assert oq.dtype == torch.bfloat16
    cos, sin = LlamaRotaryEmbedding(config=cfg)(q, positions[None])
    rq, _ = apply_rotary_pos_emb(q.view(1, 5, 2, 32).transpose(1, 2), k.view(1, 5, 2, 32).transpose(1, 2), cos, sin)
    torch.testing.assert_close(oq, rq.transpose(1, 2).reshape(5, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf_with_and_without_residual(dtype):
    hidden = 48
    ours = RMSNorm(hidden, eps=1e-5)
    ref = LlamaRMSNorm(hidden, eps=1e-5)
    w = torch.rand(hidden) + 0.5
    with torch.no_grad():
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    ours, ref = ours.to(dtype), ref.to(dtype)
    x = torch.randn(7, hidden).to(dtype)
    residual = torch.randn(7, hidden).to(dtype)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    out, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, residual + x, atol=0, rtol=0)
    torch.testing.assert_close(out, ref(residual + x), atol=0, rtol=0)
    # a per-head norm (Qwen3 q_norm) works on [T, H, D]
    heads = torch.randn(3, 4, hidden).to(dtype)
    torch.testing.assert_close(ours(heads), ref(heads), atol=0, rtol=0)


def test_silu_and_mul():
    x = torch.randn(5, 2 * 24)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :24]) * x[:, 24:])


def test_qkv_parallel_linear_fuses_q_k_v():
    hidden, head_dim, heads, kv_heads = 32, 8, 4, 2
    layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True)
    wq, wk, wv = torch.randn(heads * head_dim, hidden), torch.randn(kv_heads * head_dim, hidden), torch.randn(kv_heads * head_dim, hidden)
    bq, bk, bv = torch.randn(heads * head_dim), torch.randn(kv_heads * head_dim), torch.randn(kv_heads * head_dim)
    for shard, w, b in (("v", wv, bv), ("q", wq, bq), ("k", wk, bk)):  # any order
        layer.weight.weight_loader(layer.weight, w, shard)
        layer.bias.weight_loader(layer.bias, b, shard)
    x = torch.randn(3, hidden)
    ref = torch.cat([F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)], dim=-1)
    torch.testing.assert_close(layer(x), ref)
    # an already fused checkpoint tensor loads too
    fused = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=False)
    fused.weight.weight_loader(fused.weight, torch.cat([wq, wk, wv]))
    torch.testing.assert_close(fused.weight, layer.weight)
    with pytest.raises(ValueError, match="shard_id"):
        layer.weight.weight_loader(layer.weight, wq, "x")
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight.weight_loader(layer.weight, torch.randn(heads * head_dim, hidden + 1), "q")


def test_merged_column_parallel_linear_fuses_gate_up():
    layer = MergedColumnParallelLinear(16, [24, 24])
    gate, up = torch.randn(24, 16), torch.randn(24, 16)
    layer.weight.weight_loader(layer.weight, up, 1)
    layer.weight.weight_loader(layer.weight, gate, 0)
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), torch.cat([x @ gate.T, x @ up.T], dim=-1))


def test_column_row_replicated_linear():
    x = torch.randn(4, 16)
    w1, b1, w2, b2 = torch.randn(32, 16), torch.randn(32), torch.randn(16, 32), torch.randn(16)
    col, row, rep = ColumnParallelLinear(16, 32, bias=True), RowParallelLinear(32, 16, bias=True), ReplicatedLinear(16, 32)
    col.weight.weight_loader(col.weight, w1)
    col.bias.weight_loader(col.bias, b1)
    row.weight.weight_loader(row.weight, w2)
    row.bias.weight_loader(row.bias, b2)
    rep.weight.weight_loader(rep.weight, w1)
    torch.testing.assert_close(row(col(x)), F.linear(F.linear(x, w1, b1), w2, b2))
    torch.testing.assert_close(rep(x), x @ w1.T)


def test_embedding_and_tied_lm_head():
    vocab, hidden = 50, 8
    emb = VocabParallelEmbedding(vocab, hidden)
    table = torch.randn(vocab, hidden)
    emb.weight.weight_loader(emb.weight, table)
    ids = torch.tensor([0, 49, 7, 7])
    torch.testing.assert_close(emb(ids), table[ids])
    head = ParallelLMHead(vocab, hidden).tie_weights(emb)
    assert head.weight is emb.weight
    h = torch.randn(3, hidden)
    torch.testing.assert_close(head.get_logits(h), h @ table.T)
    with pytest.raises(ValueError, match="shape mismatch"):
        emb.weight.weight_loader(emb.weight, torch.randn(vocab + 1, hidden))
